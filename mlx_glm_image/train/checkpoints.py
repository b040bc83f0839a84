"""A run's checkpoints: everything ``--resume`` needs to continue exactly, in one folder per step below the output
(``checkpoints/step-000100``), each written whole (atomic.py: made under a temporary name, renamed when complete).

A checkpoint holds the adapter as the run's final adapter is saved (so ``--lora CHECKPOINT`` loads it too), AdamW's
state (``optimizer.safetensors``: its moments and step count) and ``state.json``: the optimizer steps done, the
steps skipped, and the run's settings. The data order and every random draw are functions of the seed and the step
(data.py, trainer.py), so nothing else is needed for a resumed run to end bit-identical to one never stopped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .. import atomic
from .config import TrainingConfig

FORMAT = 1
FOLDER = "checkpoints"
_STEP = re.compile(r"step-(\d+)")
# Settings a resumed run may change: they do not change what is computed.
FREE = frozenset({"resume", "dry_run", "output", "save_every", "validate_every", "validation_data",
                  "validation_prompts", "cache_dir"})


@dataclass(frozen=True, kw_only=True)
class State:
    step: int  # optimizer steps done
    skipped: int  # of them, steps whose loss or gradients were not finite (no update)
    config: dict  # the run's settings (TrainingConfig.as_json)


def folder_of(output: str | Path, step: int) -> Path:
    return Path(output).expanduser() / FOLDER / f"step-{step:06d}"


def save(output: str | Path, state: State, optimizer, write_adapter) -> Path:
    """The checkpoint of ``state`` below ``output``; ``write_adapter(folder)`` writes the adapter files."""
    dst = folder_of(output, state.step)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(dst, folder=True) as tmp:
        write_adapter(tmp)
        arrays = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), arrays)
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "step": state.step, "skipped": state.skipped,
                                                   "config": state.config}, indent=2))
    return dst


def latest(output: str | Path) -> Path | None:
    """The last checkpoint below a run's output, or None."""
    steps = sorted((int(m.group(1)), p) for p in (Path(output).expanduser() / FOLDER).glob("step-*")
                   if (m := _STEP.fullmatch(p.name)) and (p / "state.json").is_file())
    return steps[-1][1] if steps else None


def find(path: str | Path) -> Path:
    """The checkpoint ``--resume`` names: a checkpoint folder, or a run's output (its latest checkpoint)."""
    path = Path(path).expanduser()
    if (path / "state.json").is_file():
        return path
    found = latest(path)
    if found is None:
        raise ValueError(f"--resume {path} is no checkpoint (no state.json) and holds none in {FOLDER}/")
    return found


def read(folder: Path) -> State:
    try:
        data = json.loads((folder / "state.json").read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this version reads {FORMAT}")
        return State(step=int(data["step"]), skipped=int(data["skipped"]), config=dict(data["config"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume {folder}: its state.json cannot be read ({e})") from None


def check_same_run(state: State, config: TrainingConfig, folder: Path):
    """A resumed run must compute what the stopped one did: every setting but ``FREE`` ones equal."""
    now = config.as_json()
    for name, value in state.config.items():
        if name in FREE or name not in now:
            continue
        if now[name] != value and not (name == "targets" and tuple(now[name] or ()) == tuple(value or ())):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--resume {folder}: the run was made with {flag} {_shown(value)}, this one says "
                             f"{_shown(now[name])}; a resumed run keeps its settings")
    if state.step >= config.steps:
        raise ValueError(f"--resume {folder}: the run has done its {state.step} steps (--steps {config.steps})")


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def restore_optimizer(optimizer, folder: Path):
    """AdamW's state as the checkpoint has it (the optimizer's own state initialised first, then replaced)."""
    arrays = mx.load(str(folder / "optimizer.safetensors"))
    optimizer.state = tree_unflatten(list(arrays.items()))
