"""Train a LoRA adapter for GLM-Image's AR prior model or its DiT.

    PROG -m zai-org/GLM-Image --data my-style/ --output my-style-lora --dry-run
    PROG --config run.json --steps 2000                # the file's settings, one changed
    PROG --data my-style/ --output my-style-lora --resume my-style-lora/checkpoints/step-500

The data is a folder: metadata.jsonl with {"image": ..., "prompt": ...} per line ({"source": ..., "target": ...,
"prompt": ...} to train editing), or images each with a same-name .txt caption. Every record is checked before any
model loads. The adapter goes into --output (load it with mlx-glm-image --lora OUTPUT); checkpoints go below it.
--dry-run prints the plan (examples, steps, epochs, trainable parameters, a memory estimate) and stops.
Every setting is also a key of the --config file (its name with _ for -). docs/training.md says more.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import Parser, fail, interrupting, prog_name
from . import config as settings

NOT_YET = "the training loop is not in this version yet: --dry-run checks the data and the settings and plans the run"


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
    print(f"error: {NOT_YET}", file=sys.stderr)
    return 1
