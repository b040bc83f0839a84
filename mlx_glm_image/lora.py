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
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import atomic, loading

FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")  # PEFT's, diffusers'
GENERIC = {Path(f).stem for f in FILES}  # every adapter of its kind is named so: its folder's name names it
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha when a config leaves it out
PREFIXES = ("base_model.model.", "transformer.")  # PEFT's wrapper; a diffusers pipeline's component name
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(\.[^.]+)?\.weight$|^(?P<alpha>.+)\.alpha$")
# PEFT features that change what a layer computes, which this module does not implement: refused when set
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA-bias", "alora_invocation_tokens": "activated-LoRA (aLoRA)",
                "layer_replication": "layer-replicating",
                "target_parameters": "parameter-targeting (target_parameters)"}


class LoraError(ValueError):
    """An adapter that cannot be used as asked; the message is one line for the user."""


@dataclass(frozen=True, kw_only=True)
class LoraAdapter:
    """One adapter: who it is (the one record of it: its name, where it came from, its weights' SHA-256, the model
    it is for) and its layers, per module path (A (r, in), B (out, r), scaling)."""

    name: str
    source: str  # where it is: a local path made absolute (a record regenerates from any folder), or a repo id
    source_given: str  # as the user gave it
    sha256: str  # of the weights file
    model: str | None = None  # the component whose linear layers it names (``matched``); None until then
    origin: str = field(default="--lora", compare=False)  # what gave it: --lora, the metadata that named it, ...
    layers: dict = field(repr=False, compare=False)

    @property
    def who(self) -> str:
        """The adapter as messages name it: what gave it, and its source as given ("--lora ./style")."""
        return f"{self.origin} {self.source_given}"

    def targets(self) -> list[str]:
        return sorted(self.layers)

    def record(self, scale: float) -> dict:
        """The adapter at ``scale`` as the metadata and a converted folder's config record it."""
        return {"name": self.name, "source": self.source, "source_given": self.source_given, "sha256": self.sha256,
                "scale": scale, "model": self.model}


def parse(text: str) -> tuple[str, float]:
    """--lora's ``PATH[:SCALE][@NAME]`` without its name: (path, scale); see ``parse_with_name``."""
    return parse_with_name(text)[:2]


def parse_with_name(text: str) -> tuple[str, float, str | None]:
    """--lora's ``PATH[:SCALE][@NAME]``: (path, scale, name or None). The name is after the last ``@`` (when no
    ``/`` follows it), the scale after the last ``:`` before it when that is a number (default 1); a path that
    exists as typed is taken whole. One line for an empty path or name, or a scale that is not a finite number."""
    shown = text or "''"
    if text and Path(text).expanduser().exists():
        return text, 1.0, None
    name = scale = None
    head, at, tail = text.rpartition("@")
    if at and "/" not in tail:
        if not tail.strip():
            raise LoraError(f"--lora {shown}: the name after @ is empty")
        text, name = head, tail
    head, colon, tail = text.rpartition(":")
    if colon and (scale := _number(tail)) is not None:
        text = head
        if not _finite(scale):  # float() reads "nan", "inf" and "1e400" (inf)
            raise LoraError(f"--lora {shown}: the scale must be a finite number, got {tail}")
    if not text.strip():
        raise LoraError(f"--lora {shown}: the path is empty")
    return text, 1.0 if scale is None else scale, name


def check_scale(value, what: str) -> float:
    """A scale (an adapter's weight): a finite number, not a boolean or a string; one line naming ``what``."""
    if not _finite(value):
        raise LoraError(f"{what} must be a finite number, got {_described(value)}")
    return float(value)


def read(source: str, name: str | None = None, origin: str = "--lora") -> LoraAdapter:
    """The adapter at ``source``: a folder holding one of ``FILES`` (with PEFT's adapter_config.json), a
    .safetensors file, or a Hub repo id; ``origin`` is what gave it, for the messages ("--lora ./style: ...";
    the Python API's "adapter"). Every field read from it (its config, its file's metadata, its tensors) is
    checked: one line naming the adapter and the field otherwise."""
    source = str(source)
    who = f"{origin} {source or repr(source)}"
    if not source.strip():
        raise LoraError(f"{who}: the path is empty")
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise LoraError(f"{who}: its name must be non-empty text, got {_described(name)}")
    path = _weights_file(source, who)
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise LoraError(f"{who}: cannot read {path.name} ({e})") from None
    layers = _layers(tensors, _config(path, metadata, who), who)
    if not layers:
        raise LoraError(f"{who}: {path.name} holds no LoRA weights")
    local = loading.is_local(source)
    return LoraAdapter(name=name or _default_name(source), source=_absolute(source) if local else source,
                       source_given=source, origin=origin, sha256=loading.file_sha256(path), layers=layers)


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
    raise LoraError(f"{adapter.who}: its target modules fit no model here ({shown})")


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's: ``lora_alpha / r``; rsLoRA's ``lora_alpha / sqrt(r)``."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def check_shapes(adapter: LoraAdapter, model: nn.Module):
    modules = dict(model.named_modules())
    for path, (a, b, _) in adapter.layers.items():
        out_dims, in_dims = _dims(_base(modules[path]))
        if a.shape[1] != in_dims or b.shape[0] != out_dims:
            raise LoraError(f"{adapter.who}: {path} takes {in_dims} -> {out_dims}, the adapter has "
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


def _weights_file(source: str, who: str) -> Path:
    if loading.is_local(source):
        path = Path(source).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise LoraError(f"{who} does not exist")
    else:
        try:
            loading.check_repo_id(source)
        except loading.WeightsError:
            raise LoraError(f"{who} does not exist (expected a local folder or file, or a Hugging Face repo id like "
                            "org/name)") from None
        try:
            path = loading.fetch(source, [*FILES, "adapter_config.json"])
        except loading.WeightsError as e:
            raise LoraError(f"{who}: {e}") from None
    for name in FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise LoraError(f"{who}: no {' or '.join(FILES)} in it" if not found else
                    f"{who}: several .safetensors files in it; name the one to use")


def _config(path: Path, metadata: dict, who: str) -> dict:
    """PEFT's LoraConfig, checked: adapter_config.json beside the weights, else the file's lora_adapter_metadata
    (diffusers'; a pipeline's save_lora_weights prefixes its keys with ``transformer.``, which its loader strips);
    {} when neither is there."""
    beside = path.parent / "adapter_config.json"
    if beside.is_file():
        where = beside.name
        try:
            text = beside.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LoraError(f"{who}: cannot read {where} ({e})") from None
    elif "lora_adapter_metadata" in (metadata or {}):
        where, text = f"the lora_adapter_metadata of {path.name}", metadata["lora_adapter_metadata"]
        if not isinstance(text, str):
            raise LoraError(f"{who}: {where} must be JSON text, got {_described(text)}")
    else:
        return {}  # no config: alpha = r (scaling 1), unless the file has .alpha tensors
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoraError(f"{who}: {where} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{who}: {where} must be a JSON object, got {_described(config)}")
    prefix = PREFIXES[1]
    if any(k.startswith(prefix) for k in config):
        config = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    return _checked_config(config, where, who)


def _checked_config(config: dict, where: str, who: str) -> dict:
    """``config`` with every field this module reads checked, type and range, as PEFT means it (an absent field
    takes its default; null only where PEFT's default is null), and the features it does not implement refused."""
    from .pipeline.checks import is_int

    def texts(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def flag(v):
        return isinstance(v, bool)

    fields = {
        "peft_type": (lambda v: v in (None, "LORA"), '"LORA" (only LoRA adapters are read)'),
        "r": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "lora_alpha": (_finite, "a finite number"),
        **{key: (flag, "true or false") for key in ("use_rslora", "use_dora", "lora_bias")},
        "rank_pattern": (lambda v: v is None or isinstance(v, dict), "an object (module pattern: rank)"),
        "alpha_pattern": (lambda v: v is None or isinstance(v, dict), "an object (module pattern: alpha)"),
        "target_modules": (lambda v: v is None or isinstance(v, str) or texts(v),
                           "a list of module names or a regular expression"),
        "layers_to_transform": (lambda v: v is None or (is_int(v) and v >= 0)
                                or (isinstance(v, list) and all(is_int(x) and x >= 0 for x in v)),
                                "a block number or a list of them (integers >= 0)"),
        "layers_pattern": (lambda v: v is None or isinstance(v, str) or texts(v), "a name or a list of names"),
        "modules_to_save": (lambda v: v is None or texts(v), "a list of module names"),
    }
    for key, (ok, what) in fields.items():
        if key in config and not ok(config[key]):
            raise LoraError(f"{who}: {key} in {where} must be {what}, got {_described(config[key])}")
    if isinstance(config.get("target_modules"), str):
        _regex(config["target_modules"], f"target_modules in {where}", who)
    for key, ok, what in (("rank_pattern", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
                          ("alpha_pattern", _finite, "a finite number")):
        for pattern, value in (config.get(key) or {}).items():
            _regex(pattern, f"{key} in {where}", who)
            if not ok(value):
                raise LoraError(f"{who}: {key}[{pattern!r}] in {where} must be {what}, got {_described(value)}")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise LoraError(f"{who}: {what} adapters are not supported ({key} in {where})")
    if config.get("modules_to_save"):
        raise LoraError(f"{who}: adapters that save whole modules (modules_to_save) are not supported")
    return config


def _regex(pattern: str, what: str, who: str):
    """A module pattern as PEFT matches it (``(.*\\.)?(PATTERN)$``) must compile."""
    try:
        re.compile(rf"(.*\.)?({pattern})$")
    except re.error as e:
        raise LoraError(f"{who}: {pattern!r} in {what} is not a regular expression ({e})") from None


def _layers(tensors: dict, config: dict, who: str) -> dict:
    """{module: (A, B, scaling)} from the file's tensors, each checked: one lora_A and one lora_B of a float
    dtype per module, a low-rank pair (rank >= 1; the config's r or rank_pattern when it gives one: PEFT refuses
    another), a ``.alpha`` of one finite number, and every value finite. The scaling is PEFT's (``scaling``)."""
    pairs, alphas = {}, {}
    for key, value in tensors.items():
        match = _KEY.match(_strip(key))
        if match is None:
            raise LoraError(f"{who}: {key} is not a LoRA weight (lora_A/lora_B or lora_down/lora_up)")
        if match["alpha"]:
            if match["alpha"] in alphas:
                raise LoraError(f"{who}: {match['alpha']} has two .alpha tensors")
            alphas[match["alpha"]] = _alpha(key, value, who)
            continue
        if not mx.issubdtype(value.dtype, mx.floating):
            raise LoraError(f"{who}: {key} is {_dtype_name(value)}, not a float")
        kind = "A" if match["kind"] in ("lora_A", "lora_down") else "B"
        pair = pairs.setdefault(match["module"], {})
        if kind in pair:
            raise LoraError(f"{who}: {match['module']} has two lora_{kind} weights ({pair[kind][0]} and {key})")
        pair[kind] = (key, value)
    layers = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LoraError(f"{who}: {module} has only {', '.join(pair)} of its lora_A/lora_B pair")
        a, b = pair["A"][1], pair["B"][1]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise LoraError(f"{who}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                            "which are not a low-rank pair")
        r = a.shape[0]
        if "r" in config and r != (want := _pattern(config.get("rank_pattern"), module, config["r"])):
            raise LoraError(f"{who}: {module} has rank {r}, its LoRA config says {want} (r, rank_pattern)")
        # a config without lora_alpha takes PEFT's LoraConfig default; no config at all, diffusers' rule: alpha = r
        alpha = alphas.get(module, _pattern(config.get("alpha_pattern"), module,
                                            config.get("lora_alpha", PEFT_DEFAULT_ALPHA if config else r)))
        layers[module] = (a.astype(mx.float32), b.astype(mx.float32),
                          scaling(alpha, r, config.get("use_rslora", False)))
    _check_finite(tensors, who)
    mx.eval([t for a, b, _ in layers.values() for t in (a, b)])  # read now, on this thread (see apply)
    return layers


def _alpha(key: str, value: mx.array, who: str) -> float:
    """A kohya-style ``.alpha``: one finite number."""
    if value.size != 1 or not mx.issubdtype(value.dtype, mx.number):
        raise LoraError(f"{who}: {key} must be one number, it is {_dtype_name(value)} of shape {tuple(value.shape)}")
    alpha = value.reshape(-1)[0].item()
    if not math.isfinite(alpha):
        raise LoraError(f"{who}: {key} must be a finite number, got {alpha}")
    return float(alpha)


def _dtype_name(value: mx.array) -> str:
    return str(value.dtype).rpartition(".")[2]  # "mlx.core.int32": int32


def _check_finite(tensors: dict, who: str):
    """Every weight finite: a NaN in an adapter would make every image NaN, late; said now, naming the tensor."""
    finite = {key: mx.isfinite(value).all() for key, value in tensors.items()}
    mx.eval(list(finite.values()))
    for key, ok in finite.items():
        if not ok.item():
            raise LoraError(f"{who}: {key} holds NaN or infinite values")


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


def _absolute(source: str) -> str:
    """A local path made absolute, links kept (a Hub cache's file is a link to a blob without its suffix)."""
    return os.path.abspath(Path(source).expanduser())


def _default_name(source: str) -> str:
    """The name an adapter gets when none is given: a repo id's last part, a folder's name, a file's stem, or
    its folder's name when its file has one of the names every adapter of its kind has (``GENERIC``)."""
    if not loading.is_local(source):
        return source.rstrip("/").rpartition("/")[2]
    where = Path(_absolute(source))
    if where.is_file():
        where = where.parent if where.stem in GENERIC else where.with_suffix("")
    return where.name or "adapter"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _finite(value) -> bool:
    """A finite real number (a boolean is none; an integer too large for a float is not finite)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _described(value) -> str:
    from .pipeline.checks import described

    return described(value)


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
