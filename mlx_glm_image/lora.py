"""LoRA adapters: low-rank updates beside the linear layers of the AR prior model or the DiT, as people train them.

Files: PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``,
what ``PeftModel.save_pretrained`` writes for transformers' ``GlmImageForConditionalGeneration``) and diffusers' (the
DiT's ``save_lora_adapter``: ``pytorch_lora_weights.safetensors``, keys ``[transformer.]<module>.lora_A.weight``, the
LoRA config in the file's ``lora_adapter_metadata``), from a folder, a file or a Hugging Face repo id (the loading
rule, loading.py). The module paths are the reference's, which are ours (parameter names equal the reference's), so
which model an adapter is for is the one whose linear layers its paths name.

A layer with adapters becomes a ``LoRALinear``: the base layer (full precision or quantized) is kept as it is, and
each active adapter adds ``weight * scaling * (x @ A.T) @ B.T`` with ``scaling = lora_alpha / r`` (PEFT's; rsLoRA:
``/ sqrt(r)``). Removing them puts the very base layer back, so its outputs are bit-identical to before. ``fuse``
folds the active adapters into full-precision weights (one matmul a layer instead of three), keeping the originals
to unfuse.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import loading

FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")  # PEFT's, diffusers'
PREFIXES = ("base_model.model.", "transformer.")  # PEFT's wrapper; a diffusers pipeline's component name
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(\.[^.]+)?\.weight$|^(?P<alpha>.+)\.alpha$")


class LoraError(ValueError):
    """An adapter that cannot be used as asked; the message is one line for the user."""


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter file, read: per module path, (A (r, in), B (out, r), scaling)."""

    name: str
    source: str  # as the user gave it: a folder, a file or a repo id
    sha256: str  # of the weights file
    layers: dict

    def targets(self) -> list[str]:
        return sorted(self.layers)


def parse(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (a repo id or a path; the scale after the last colon when it is a number; default 1)."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def read(source: str, name: str | None = None) -> LoraAdapter:
    """The adapter at ``source``: a folder holding one of ``FILES`` (with PEFT's adapter_config.json), a
    .safetensors file, or a Hub repo id."""
    path = _weights_file(source)
    try:
        weights = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise LoraError(f"--lora {source}: cannot read {path.name} ({e})") from None
    tensors, metadata = weights
    config = _config(path, metadata, source)
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(flag):
            raise LoraError(f"--lora {source}: {what} adapters are not supported")
    if config.get("modules_to_save"):
        raise LoraError(f"--lora {source}: adapters that save whole modules (modules_to_save) are not supported")
    pairs, alphas = {}, {}
    for key, value in tensors.items():
        match = _KEY.match(_strip(key))
        if match is None:
            raise LoraError(f"--lora {source}: {key} is not a LoRA weight (lora_A/lora_B or lora_down/lora_up)")
        if match["alpha"]:
            alphas[match["alpha"]] = float(value.reshape(-1)[0].item())
            continue
        pairs.setdefault(match["module"], {})["A" if match["kind"] in ("lora_A", "lora_down") else "B"] = value
    layers = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LoraError(f"--lora {source}: {module} has only {', '.join(pair)} of its lora_A/lora_B pair")
        a, b = pair["A"].astype(mx.float32), pair["B"].astype(mx.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"--lora {source}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                            "which are not a low-rank pair")
        r = a.shape[0]
        alpha = alphas.get(module, _pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
        layers[module] = (a, b, alpha / (math.sqrt(r) if config.get("use_rslora") else r))
    if not layers:
        raise LoraError(f"--lora {source}: {path.name} holds no LoRA weights")
    mx.eval([t for a, b, _ in layers.values() for t in (a, b)])  # read now, on this thread (see apply)
    return LoraAdapter(name=name or _default_name(source), source=str(source), sha256=loading.file_sha256(path), layers=layers)


def component_of(adapter: LoraAdapter, skeletons: dict) -> str:
    """Which model (by component name) the adapter's module paths are linear layers of; one line if none."""
    missing = {}
    for component, model in skeletons.items():
        linears = {path for path, m in model.named_modules() if _is_linear(m)}
        missing[component] = [t for t in adapter.targets() if t not in linears]
        if not missing[component]:
            check_shapes(adapter, model)
            return component
    shown = "; ".join(f"{c} has no linear layer {m[0]}" for c, m in missing.items())
    raise LoraError(f"--lora {adapter.source}: its target modules fit no model here ({shown})")


def check_shapes(adapter: LoraAdapter, model: nn.Module):
    modules = dict(model.named_modules())
    for path, (a, b, _) in adapter.layers.items():
        out_dims, in_dims = _dims(_base(modules[path]))
        if a.shape[1] != in_dims or b.shape[0] != out_dims:
            raise LoraError(f"--lora {adapter.source}: {path} takes {in_dims} -> {out_dims}, the adapter has "
                            f"{a.shape[1]} -> {b.shape[0]}")


class LoRALinear(nn.Module):
    """A linear layer (plain or quantized, never changed) with low-rank adapters beside it."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters: dict = {}  # name -> (A, B, scaling), in the base's dtype
        object.__setattr__(self, "_weights", {})  # name -> the weight set_adapters gave it
        self.freeze()

    @property
    def weights(self) -> dict:
        return self._weights

    def set(self, adapters: dict, weights: dict):
        self.adapters = adapters
        object.__setattr__(self, "_weights", dict(weights))

    def __call__(self, x):
        y = self.base(x)
        for name, (a, b, scaling) in self.adapters.items():
            y = y + (self._weights[name] * scaling) * ((x @ a.T) @ b.T)
        return y


def apply(model: nn.Module, active: list[tuple[LoraAdapter, float]]):
    """Make ``model``'s adapters exactly ``active`` ((adapter, weight) pairs): wrap the layers they name, set every
    wrapped layer's adapters and weights, and put back the base layer where none is left."""
    unfuse(model)
    wanted: dict[str, dict] = {}
    for adapter, weight in active:
        for path in adapter.layers:
            wanted.setdefault(path, {})[adapter.name] = (adapter, weight)
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if isinstance(module, LoRALinear) and path not in wanted:
            _replace(model, path, module.base)
    modules = dict(model.named_modules())
    for path, by_name in wanted.items():
        layer = modules[path]
        layer = layer if isinstance(layer, LoRALinear) else _wrap(model, path, layer)
        dtype = _dtype(layer.base)
        layer.set({n: (a.layers[path][0].astype(dtype), a.layers[path][1].astype(dtype), a.layers[path][2])
                   for n, (a, _) in by_name.items()}, {n: w for n, (_, w) in by_name.items()})
        # evaluated here: a lazy array made on this thread cannot be computed on another (the server's worker)
        mx.eval([t for a, b, _ in layer.adapters.values() for t in (a, b)])


def fuse(model: nn.Module) -> list[str]:
    """Fold the active adapters into full-precision layers' weights (a quantized layer keeps its separate path);
    the original weight is kept, for ``unfuse``. Returns the paths fused."""
    fused = []
    for path, layer in dict(model.named_modules()).items():
        if isinstance(layer, LoRALinear) and isinstance(layer.base, nn.Linear) and layer.adapters:
            base = layer.base
            merged = nn.Linear(base.weight.shape[1], base.weight.shape[0], bias="bias" in base)
            merged.weight = merged_weight(base.weight, [(a, b, s, layer.weights[n]) for n, (a, b, s) in layer.adapters.items()])
            if "bias" in base:
                merged.bias = base.bias
            mx.eval(merged.weight)
            _replace(model, path, FusedLinear(merged, layer))
            fused.append(path)
    return fused


def unfuse(model: nn.Module):
    for path, layer in dict(model.named_modules()).items():
        if isinstance(layer, FusedLinear):
            _replace(model, path, layer.unfused)


def merged_weight(weight: mx.array, pairs) -> mx.array:
    """``weight + sum(w * scaling * B @ A)`` over (A, B, scaling, w), in float32, back in the weight's dtype: the one
    rule of folding an adapter in (``fuse``, and convert.py's --lora)."""
    delta = sum((w * s) * (b.astype(mx.float32) @ a.astype(mx.float32)) for a, b, s, w in pairs)
    return (weight.astype(mx.float32) + delta).astype(weight.dtype)


def folded(adapters: list[tuple[LoraAdapter, float]], key: str, weight: mx.array) -> mx.array:
    """A checkpoint tensor with the adapters that target its layer folded in (``key``: ``<module>.weight``)."""
    module, _, leaf = key.rpartition(".")
    pairs = [(*a.layers[module], w) for a, w in adapters if leaf == "weight" and module in a.layers]
    return merged_weight(weight, pairs) if pairs else weight


def record(adapter: LoraAdapter, weight: float, component: str) -> dict:
    """An adapter as the metadata and a converted folder's config record it."""
    return {"name": adapter.name, "source": adapter.source, "sha256": adapter.sha256, "scale": weight, "model": component}


class FusedLinear(nn.Module):
    """A layer with its adapters folded in; ``unfused`` is the LoRALinear (and base) it came from."""

    def __init__(self, merged: nn.Linear, unfused: LoRALinear):
        super().__init__()
        self.merged = merged
        object.__setattr__(self, "unfused", unfused)  # not a child: its weights are not this layer's
        self.freeze()

    def __call__(self, x):
        return self.merged(x)


def remove(model: nn.Module):
    """Every adapter off: the base layers back in place."""
    apply(model, [])


# ---------------------------------------------------------------------------------------------------------


def _weights_file(source: str) -> Path:
    if loading.is_local(source):
        path = Path(source).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise LoraError(f"--lora {source} does not exist")
    else:
        path = loading.fetch(str(source), [*FILES, "adapter_config.json"])
    for name in FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise LoraError(f"--lora {source}: no {' or '.join(FILES)} in it" if not found else
                    f"--lora {source}: several .safetensors files in it; name the one to use")


def _config(path: Path, metadata: dict, source: str) -> dict:
    """PEFT's LoraConfig: adapter_config.json beside the weights, else the file's lora_adapter_metadata (diffusers')."""
    try:
        if (path.parent / "adapter_config.json").is_file():
            return json.loads((path.parent / "adapter_config.json").read_text())
        if "lora_adapter_metadata" in (metadata or {}):
            return json.loads(metadata["lora_adapter_metadata"])
    except json.JSONDecodeError as e:
        raise LoraError(f"--lora {source}: its LoRA config is not valid JSON ({e})") from None
    return {}  # no config: alpha = r (scaling 1), unless the file has .alpha tensors


def _pattern(patterns: dict | None, module: str, default):
    """PEFT's rank/alpha pattern rule: a key matches a module path that is it or ends with ``.key``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _default_name(source: str) -> str:
    return Path(str(source).rstrip("/")).stem or str(source)


def _is_linear(module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear, LoRALinear))


def _base(module):
    return module.base if isinstance(module, LoRALinear) else module


def _dims(layer) -> tuple[int, int]:
    """(out, in) of a plain or quantized linear layer."""
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[0], layer.weight.shape[1] * 32 // layer.bits
    return tuple(layer.weight.shape)


def _dtype(layer):
    return layer.scales.dtype if isinstance(layer, nn.QuantizedLinear) else layer.weight.dtype


def _wrap(model, path: str, layer) -> LoRALinear:
    wrapped = LoRALinear(layer)
    _replace(model, path, wrapped)
    return wrapped


def _replace(model: nn.Module, path: str, new: nn.Module):
    *parents, last = path.split(".")
    owner = model
    for part in parents:
        owner = owner[int(part)] if isinstance(owner, list) else owner[part]
    if isinstance(owner, list):
        owner[int(last)] = new
    else:
        setattr(owner, last, new)
