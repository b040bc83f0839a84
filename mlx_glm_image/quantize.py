"""Quantization, one place for the converter and for quantizing at load time: the modes MLX offers, a spec,
sizes, and applying either a spec (by the model's own ``quant_predicate``) or what a folder stores.

Which layers may be quantized is the models' business (``quant_predicate``); a layer whose input width is not a
multiple of the group size cannot be, whatever the model says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

# Quantization modes and their (bits, group sizes) as MLX documents them; the installed MLX is asked too.
MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "nvfp4": ((4,), (16,)),
    "mxfp8": ((8,), (32,)),
}
BITS = sorted({b for bits, _ in MODES.values() for b in bits})


class QuantizeError(ValueError):
    """A quantization that cannot be done as asked; its message is one line for the user."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}


def available_modes() -> list[str]:
    modes = []
    for mode, (bits, groups) in MODES.items():
        try:
            mx.eval(mx.quantize(mx.zeros((8, 256)), group_size=groups[0], bits=bits[0], mode=mode))
            modes.append(mode)
        except Exception:
            pass
    return modes


def quant_spec(bits: int | None = None, group_size: int | None = None, mode: str = "affine") -> QuantSpec:
    """A checked spec; bits default to 4 (or the mode's only width), the group to 64 (or the mode's only one).
    Values may come from a config.json (check_stored): any type is refused in one line, 0 is not a default."""
    if not isinstance(mode, str) or mode not in MODES:
        raise QuantizeError(f"unknown quantization mode {mode!r}; this MLX offers {', '.join(available_modes())}")
    allowed_bits, allowed_groups = MODES[mode]
    bits = bits if bits is not None else (4 if 4 in allowed_bits else allowed_bits[0])
    group_size = group_size if group_size is not None else (64 if 64 in allowed_groups else allowed_groups[0])
    if not _is_one_of(bits, allowed_bits) or not _is_one_of(group_size, allowed_groups):
        raise QuantizeError(f"mode {mode} takes bits {list(allowed_bits)} and group sizes {list(allowed_groups)}, "
                            f"got bits {bits!r}, group size {group_size!r}")
    return QuantSpec(bits, group_size, mode)


def _is_one_of(value, allowed) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in allowed


def check_stored(quantization) -> None:
    """A config.json's ``quantization`` block as apply_stored reads it: an object holding a spec (bits, group_size,
    mode; the defaults where absent) and, per layer, false (kept) or an object overriding the spec."""
    if not isinstance(quantization, dict):
        raise QuantizeError(f"quantization must be an object with bits, group_size and mode, got {quantization!r}")
    _block_spec(quantization)
    for layer, override in quantization.items():
        if layer in ("bits", "group_size", "mode"):
            continue
        if not isinstance(override, (bool, dict)):
            raise QuantizeError(f"quantization of {layer} must be false or an object, got {override!r}")
        stored_spec(quantization, layer)


def stored_spec(quantization: dict, layer: str) -> QuantSpec | None:
    """The spec a config.json's ``quantization`` block gives ``layer``: None where it keeps the layer (false), the
    layer's own object over the block's spec, else the block's spec."""
    spec = _block_spec(quantization)
    override = quantization.get(layer, True)
    if override is False:
        return None
    if isinstance(override, dict):
        return quant_spec(override.get("bits", spec.bits), override.get("group_size", spec.group_size),
                          override.get("mode", spec.mode))
    return spec


def _block_spec(quantization: dict) -> QuantSpec:
    """A ``quantization`` block's own spec (the defaults where absent)."""
    return quant_spec(quantization.get("bits"), quantization.get("group_size"), quantization.get("mode", "affine"))


def as_spec(quantize) -> QuantSpec:
    """A QuantSpec from a spec, a bit width (affine, group 64) or a ``{"bits", "group_size", "mode"}`` dict."""
    if isinstance(quantize, QuantSpec):
        return quantize
    if isinstance(quantize, dict):
        return quant_spec(quantize.get("bits"), quantize.get("group_size"), quantize.get("mode", "affine"))
    if isinstance(quantize, bool) or not isinstance(quantize, int):
        raise QuantizeError(f"quantize must be a bit width ({', '.join(map(str, BITS))}) or a spec, got {quantize!r}")
    return quant_spec(quantize)


def nbytes(shape, itemsize: float) -> int:
    return int(math.prod(shape) * itemsize)


def quantized_nbytes(shape, spec: QuantSpec, scale_size: int) -> int:
    """Bytes of a weight of ``shape`` once quantized: packed values plus scales (and biases, affine)."""
    numel = math.prod(shape)
    groups = numel // spec.group_size
    scale_bytes = 1 if spec.mode != "affine" else scale_size  # fp4/fp8 modes store e8m0/e4m3 scales
    extra = groups * scale_bytes * (2 if spec.mode == "affine" else 1)
    return numel * spec.bits // 8 + extra


def quantizable_layers(model: nn.Module, group_size: int) -> tuple[set[str], dict[str, str]]:
    """(layers to quantize, {layer: why not} for the matmul/embedding layers left in full precision)."""
    chosen, kept = set(), {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if not model.quant_predicate(path, module):
            kept[path] = "kept by the model"
        elif module.weight.shape[-1] % group_size:
            kept[path] = f"input width {module.weight.shape[-1]} not a multiple of {group_size}"
        else:
            chosen.add(path)
    return chosen, kept


def config_block(spec: QuantSpec, kept) -> dict:
    """The ``quantization`` block of a config.json (mlx-lm's form): the spec, and False for each kept layer."""
    return {**spec.as_config(), **{layer: False for layer in sorted(kept)}}


def quantize_model(model: nn.Module, spec: QuantSpec, layers: set[str] | None = None) -> dict:
    """Quantize a loaded full-precision model in place by its predicate (or ``layers``, chosen before a tensor split
    narrowed them); returns its quantization block."""
    chosen, kept = quantizable_layers(model, spec.group_size)
    chosen = chosen if layers is None else layers
    nn.quantize(model, group_size=spec.group_size, bits=spec.bits, mode=spec.mode, class_predicate=lambda p, m: p in chosen)
    return config_block(spec, kept)


def apply_stored(model: nn.Module, quantization: dict, weights: dict[str, mx.array]) -> None:
    """Turn the layers that ``weights`` store quantized into quantized layers, with per-layer overrides."""

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        if isinstance(override, dict):
            return {k: override[k] for k in ("bits", "group_size", "mode") if k in override}
        return True

    nn.quantize(model, group_size=quantization.get("group_size"), bits=quantization.get("bits"),
                mode=quantization.get("mode", "affine"), class_predicate=predicate)
