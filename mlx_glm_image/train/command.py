"""Train a LoRA adapter for GLM-Image's AR prior model or its DiT.

    PROG -m zai-org/GLM-Image --data my-style/ --output my-style-lora --dry-run
    PROG -m zai-org/GLM-Image --data my-style/ --output my-style-lora --steps 500
    PROG --config run.json --steps 2000                # the file's settings, one changed
    PROG --config run.json --resume my-style-lora      # continue a stopped run from its last checkpoint

The data is a folder: metadata.jsonl with {"image": ..., "prompt": ...} per line ({"source": ..., "target": ...,
"prompt": ...} to train editing), or images each with a same-name .txt caption. Every record is checked before any
model loads. The adapter goes into --output (load it with mlx-glm-image --lora OUTPUT); checkpoints go below it,
with the loss log (loss.jsonl) and its picture (loss.png). Ctrl-C writes a checkpoint after the current step and
stops; --resume continues exactly. --dry-run prints the plan (examples, steps, epochs, trainable parameters, a
memory estimate) and stops. Every setting is also a key of the --config file (its name with _ for -).
docs/training.md says more.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import Parser, fail, interrupting, prog_name
from . import checkpoints
from . import config as settings


def build_parser() -> argparse.ArgumentParser:
    prog = prog_name("python -m mlx_glm_image.train")
    p = Parser(prog=prog, description=__doc__.replace("PROG", prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        with interrupting():
            return _main(argv)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from ..loading import WeightsError
    from . import plan as planning
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        config = settings.resolve(args)
        plan = planning.make(config)
    except DataError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except (ValueError, WeightsError, OSError) as e:
        return fail(e)
    if config.dry_run:
        print(plan.render(), flush=True)
        return 0
    from .trainer import Trainer

    try:
        trainer = Trainer(config, plan=plan)
        if trainer.rank == 0:
            print(plan.render(), flush=True)
        result = trainer.run()
    except KeyboardInterrupt:
        last = checkpoints.latest(config.output)
        print("interrupted; " + (f"the last checkpoint is {last}" if last else "no checkpoint was written"),
              file=sys.stderr)
        return 130
    except (ValueError, WeightsError, OSError) as e:
        return fail(e)
    if result.stopped:
        print(f"stopped after step {result.step}; checkpoint {result.checkpoint}: continue with the same command "
              f"and --resume {result.checkpoint}", file=sys.stderr)
        return 130
    if result.adapter is not None:
        skipped = f" ({result.skipped} skipped: not finite)" if result.skipped else ""
        print(f"trained {result.step} steps{skipped}; the adapter is in {result.adapter}: "
              f"mlx-glm-image --lora {result.adapter} ...", flush=True)
    return 0
