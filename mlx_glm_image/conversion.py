"""A conversion as planned before anything is written: each component's ``Plan`` (what is quantized, kept, folded
in) and its bytes before and after (``scan``), from the safetensors headers and the model's structure alone; the
free space it needs. The converter (convert.py) writes by it; ``--check`` (preflight.py) sizes by it, with no
weight read.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import loading as L
from . import quantize as Q
from .pipeline.components import COMPONENTS

# The component folders copied as they are (no weights to convert).
COPIED = tuple(c.name for c in COMPONENTS if c.model is None)
# Free space asked beyond the planned tensor bytes: safetensors headers, the index and config files, and the file
# system's own blocks.
SPACE_MARGIN = (0.05, 64 << 20)


class ConvertError(Exception):
    """A conversion that cannot go on; its message is the one line the user sees."""


@dataclass
class Plan:
    """One component's conversion, known from the headers and the model's structure alone."""

    component: type
    folder: Path
    config: dict
    model: nn.Module
    quantize: set[str]
    kept: dict[str, str]
    spec: Q.QuantSpec | None
    dtype: mx.Dtype | None
    expected: dict[str, tuple]
    adapters: list = field(default_factory=list)  # (lora.LoraAdapter, scale) folded into the weights

    @classmethod
    def make(cls, component, folder, spec, dtype):
        config = L.read_config(folder)
        index = folder / "model.safetensors.index.json"
        converted = index.exists() and L.read_index(index).get("metadata", {}).get("format") == "mlx"
        if "quantization" in config or converted:
            raise ConvertError(f"{folder} is already an MLX conversion; load it directly or convert the original checkpoint")
        model = L.build(component, config, folder)
        if spec is not None:
            chosen, kept = Q.quantizable_layers(model, spec.group_size)
        else:
            chosen, kept = set(), {}
        expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        return cls(component, folder, config, model, chosen, kept, spec, dtype, expected)

    def is_quantized(self, key: str) -> bool:
        layer, _, leaf = key.rpartition(".")
        return leaf == "weight" and layer in self.quantize

    def out_config(self) -> dict:
        config = dict(self.config)
        if self.spec is not None and self.quantize:
            config["quantization"] = Q.config_block(self.spec, self.kept)
        if self.adapters:  # baked in: the folder's weights are the base's with these folded in
            config["lora"] = [a.record(w) for a, w in self.adapters]
        return config


def scan(plan: Plan) -> tuple[int, int]:
    """Check every shard's header, key and shape against the model before anything is written or read,
    and return (bytes now, bytes after) as planned from the headers alone."""
    before = after = 0
    seen: set[str] = set()
    for f in L.safetensors_files(plan.folder):
        for key, info in L.read_safetensors_header(f).items():
            size = L.SAFETENSORS_ITEMSIZE.get(info["dtype"], 4)
            shape = tuple(info["shape"])
            before += Q.nbytes(shape, size)
            out_size = size if plan.dtype is None or info["dtype"] not in ("F32", "F16", "BF16") else plan.dtype.size
            # sanitize may rename or re-lay a tensor; lazy zeros of the right shape are never allocated
            for name, value in plan.model.sanitize({key: mx.zeros(shape)}).items():
                if name not in plan.expected:
                    raise ConvertError(f"{plan.folder}: unexpected weight {name} in {f.name}")
                if tuple(value.shape) != plan.expected[name]:
                    raise ConvertError(
                        f"{plan.folder}: weight {name} has shape {tuple(value.shape)}, the model expects {plan.expected[name]}"
                    )
                if name in seen:
                    raise ConvertError(f"{plan.folder}: weight {name} appears twice")
                seen.add(name)
                after += Q.quantized_nbytes(shape, plan.spec, out_size) if plan.is_quantized(name) else Q.nbytes(shape, out_size)
    missing = sorted(set(plan.expected) - seen)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConvertError(f"{plan.folder}: missing weights {', '.join(missing[:3])}{more}")
    return before, after


def check_free_space(dst: Path, needed: int):
    free = shutil.disk_usage(dst.parent).free
    share, extra = SPACE_MARGIN
    need = int(needed * (1 + share)) + extra
    if free < need:
        raise ConvertError(f"{dst.parent} has {human(free)} free; the conversion needs {human(need)} ({human(needed)} "
                           f"of files plus a margin of {share:.0%} and {human(extra)})")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)
