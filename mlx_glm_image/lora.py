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

Training puts one trainable adapter on the same layer (mlx-lm's ``LoRALinear.from_base``): ``lora_A`` (r, in) and
``lora_B`` (out, r) in PEFT's layout, initialised as PEFT initialises them, on the linear layers a ``LoraConfig``
targets (PEFT's ``target_modules`` rule, ``add_trainable``); ``save_peft`` writes them as ``PeftModel.save_pretrained``
does, so the file this module reads back is the adapter trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import atomic, loading

FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")  # PEFT's, diffusers'
PREFIXES = ("base_model.model.", "transformer.")  # PEFT's wrapper; a diffusers pipeline's component name
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(\.[^.]+)?\.weight$|^(?P<alpha>.+)\.alpha$")


class LoraError(ValueError):
    """An adapter that cannot be used as asked; the message is one line for the user."""


@dataclass(frozen=True, kw_only=True)
class LoraAdapter:
    """One adapter: who it is (the one record of it: its name, where it came from, its weights' SHA-256, the model
    it is for) and its layers, per module path (A (r, in), B (out, r), scaling)."""

    name: str
    source: str  # as the user gave it: a folder, a file or a repo id
    sha256: str  # of the weights file
    model: str | None = None  # the component whose linear layers it names (``matched``); None until then
    layers: dict = field(repr=False, compare=False)

    def targets(self) -> list[str]:
        return sorted(self.layers)

    def record(self, scale: float) -> dict:
        """The adapter at ``scale`` as the metadata and a converted folder's config record it."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "scale": scale, "model": self.model}


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
        layers[module] = (a, b, scaling(alpha, r, config.get("use_rslora", False)))
    if not layers:
        raise LoraError(f"--lora {source}: {path.name} holds no LoRA weights")
    mx.eval([t for a, b, _ in layers.values() for t in (a, b)])  # read now, on this thread (see apply)
    return LoraAdapter(name=name or _default_name(source), source=str(source), sha256=loading.file_sha256(path), layers=layers)


def matched(adapter: LoraAdapter, skeletons: dict) -> LoraAdapter:
    """The adapter with its ``model``: the one (by component name, of ``skeletons``) whose linear layers its module
    paths are, with the shapes it has; one line if none."""
    missing = {}
    for component, model in skeletons.items():
        linears = {path for path, m in model.named_modules() if _is_linear(m)}
        missing[component] = [t for t in adapter.targets() if t not in linears]
        if not missing[component]:
            check_shapes(adapter, model)
            return dataclasses.replace(adapter, model=component)
    shown = "; ".join(f"{c} has no linear layer {m[0]}" for c, m in missing.items())
    raise LoraError(f"--lora {adapter.source}: its target modules fit no model here ({shown})")


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's: ``lora_alpha / r``; rsLoRA's ``lora_alpha / sqrt(r)``."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def check_shapes(adapter: LoraAdapter, model: nn.Module):
    modules = dict(model.named_modules())
    for path, (a, b, _) in adapter.layers.items():
        out_dims, in_dims = _dims(_base(modules[path]))
        if a.shape[1] != in_dims or b.shape[0] != out_dims:
            raise LoraError(f"--lora {adapter.source}: {path} takes {in_dims} -> {out_dims}, the adapter has "
                            f"{a.shape[1]} -> {b.shape[0]}")


class LoRALinear(nn.Module):
    """A linear layer (plain or quantized, never changed) with low-rank adapters beside it: the named ones read from
    files (``apply``), and at most one trainable pair (``from_base``)."""

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

    @classmethod
    def from_base(cls, base: nn.Module, *, r: int, scaling: float, key: mx.array) -> LoRALinear:
        """``base`` (a linear layer, or one with adapters already) with a trainable pair: ``lora_A`` as torch's
        ``nn.Linear`` initialises a weight (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and
        ``lora_B`` zeros, as PEFT does, so the layer starts equal to its base; float32 whatever the base."""
        layer = base if isinstance(base, LoRALinear) else cls(base)
        out_dims, in_dims = _dims(layer.base)
        bound = 1 / math.sqrt(in_dims)
        layer.lora_A = mx.random.uniform(-bound, bound, (r, in_dims), key=key)
        layer.lora_B = mx.zeros((out_dims, r))
        layer.scaling = scaling
        layer.unfreeze(recurse=False, keys=["lora_A", "lora_B"])
        return layer

    @property
    def trainable(self) -> bool:
        return "lora_A" in self

    def pairs(self) -> list[tuple]:
        """(A, B, scaling, weight) of every adapter on this layer."""
        named = [(a, b, s, self._weights[n]) for n, (a, b, s) in self.adapters.items()]
        return named + ([(self.lora_A, self.lora_B, self.scaling, 1.0)] if self.trainable else [])

    def __call__(self, x):
        y = self.base(x)
        for name, (a, b, scaling) in self.adapters.items():
            y = y + (self._weights[name] * scaling) * ((x @ a.T) @ b.T)
        if self.trainable:  # float32 beside any base: back in the base's dtype, as mlx-lm's
            y = y + (self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)).astype(y.dtype)
        return y


def apply(model: nn.Module, active: list[tuple[LoraAdapter, float]]):
    """Make ``model``'s adapters exactly ``active`` ((adapter, weight) pairs): wrap the layers they name, set every
    wrapped layer's adapters and weights, and put back the base layer where none is left (a layer being trained
    keeps its trainable pair)."""
    unfuse(model)
    wanted: dict[str, dict] = {}
    for adapter, weight in active:
        for path in adapter.layers:
            wanted.setdefault(path, {})[adapter.name] = (adapter, weight)
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if isinstance(module, LoRALinear) and path not in wanted and not module.trainable:
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
        if isinstance(layer, LoRALinear) and isinstance(layer.base, nn.Linear) and layer.pairs():
            base = layer.base
            merged = nn.Linear(base.weight.shape[1], base.weight.shape[0], bias="bias" in base)
            merged.weight = merged_weight(base.weight, layer.pairs())
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


# ---- training ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """The trainable adapters to put on a model, in PEFT's ``LoraConfig`` fields (``adapter_config.json`` holds them
    as they are): ``target_modules`` a list of names (a module path ending in ``.name``, or the whole path) or one
    regex (the whole path fully matched); ``layers_to_transform`` the block numbers to take (with a list of names
    only), found after ``layers_pattern`` (default: the last ``.<name>.<number>.`` in the path)."""

    r: int = 8
    lora_alpha: float = 16
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: str | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise LoraError("layers_to_transform takes a list of target modules, not a pattern")

    @property
    def scaling(self) -> float:
        return scaling(self.lora_alpha, self.r, self.use_rslora)

    def targets(self, path: str) -> bool:
        """Whether the module at ``path`` is a target (PEFT's ``check_target_module_exists``)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        if path in self.target_modules:
            return True
        if not any(path.endswith(f".{name}") for name in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        # the first numbered segment (PEFT: not a nested index such as an expert's), after layers_pattern if given
        block = re.match(rf"(?:^|.*?\.){self.layers_pattern}\.(\d+)\." if self.layers_pattern
                         else r".*?\.[^.]*\.(\d+)\.", path)
        return block is not None and int(block.group(1)) in self.layers_to_transform

    def unused(self, paths) -> list[str]:
        """The target names (or the one pattern) that pick none of ``paths``: a misspelt --targets."""
        if isinstance(self.target_modules, str):
            return [] if any(self.targets(p) for p in paths) else [self.target_modules]
        return [n for n in self.target_modules if not any(LoraConfig(target_modules=(n,)).targets(p) for p in paths)]

    def peft_dict(self) -> dict:
        """``adapter_config.json`` as PEFT writes it for a LoRA on a causal LM."""
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {"peft_type": "LORA", "task_type": None, "r": self.r, "lora_alpha": self.lora_alpha,
                "target_modules": targets, "use_rslora": self.use_rslora, "lora_dropout": 0.0, "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False, "modules_to_save": None,
                "layers_to_transform": None if self.layers_to_transform is None else list(self.layers_to_transform),
                "layers_pattern": self.layers_pattern, "rank_pattern": {}, "alpha_pattern": {}}


def target_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """{path: (in, out)} of the linear layers (plain or quantized) that ``config`` targets, in path order: the one
    rule of which layers get adapters, for training and for the plan of a run."""
    found = {p: _dims(_base(m))[::-1] for p, m in sorted(model.named_modules()) if _is_linear(m) and config.targets(p)}
    if not found:
        raise LoraError(f"no linear layer of the model matches the target modules {config.target_modules}")
    return found


def add_trainable(model: nn.Module, config: LoraConfig, key: mx.array) -> list[str]:
    """Freeze ``model`` and put a trainable adapter on each linear layer ``config`` targets (mlx-lm's
    ``linear_to_lora_layers``); each layer's A from its own split of ``key``, in path order. Returns the paths."""
    model.freeze()
    modules = dict(model.named_modules())
    paths = list(target_shapes(model, config))
    for path, k in zip(paths, mx.random.split(key, len(paths))):
        _replace(model, path, LoRALinear.from_base(modules[path], r=config.r, scaling=config.scaling, key=k))
    mx.eval(model.trainable_parameters())
    return paths


def trained(model: nn.Module) -> dict[str, tuple[mx.array, mx.array]]:
    """The trainable pairs of ``model``: module path -> (lora_A, lora_B)."""
    return {path: (m.lora_A, m.lora_B) for path, m in model.named_modules()
            if isinstance(m, LoRALinear) and m.trainable}


def save_peft(folder: Path, model: nn.Module, config: LoraConfig) -> Path:
    """The trained adapter as ``PeftModel.save_pretrained`` writes it: ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_A.weight``) and ``adapter_config.json`` in ``folder``, each file written whole
    (the folder may hold more: a run's checkpoints). Returns the folder."""
    folder = Path(folder)
    _save_trained(folder / FILES[0], model, PREFIXES[0], {"format": "pt"})
    with atomic.replacing(folder / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config.peft_dict(), indent=2))
    return folder


def save_diffusers(folder: Path, model: nn.Module, config: LoraConfig) -> Path:
    """The DiT's trained adapter as diffusers' ``save_lora_adapter`` writes it: ``pytorch_lora_weights.safetensors``
    (keys ``<module>.lora_A.weight``, the config in its ``lora_adapter_metadata``) in ``folder``, written whole.
    Returns the file."""
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config.peft_dict(), indent=2, sort_keys=True)}
    return _save_trained(Path(folder) / FILES[1], model, "", metadata)


def _save_trained(dst: Path, model: nn.Module, prefix: str, metadata: dict) -> Path:
    from safetensors.numpy import save_file

    tensors = {}
    for path, (a, b) in trained(model).items():
        tensors[f"{prefix}{path}.lora_A.weight"] = np.array(a)
        tensors[f"{prefix}{path}.lora_B.weight"] = np.array(b)
    with atomic.replacing(dst) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return dst


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
