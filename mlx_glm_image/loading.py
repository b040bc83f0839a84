"""Reading checkpoints: one rule for where a component's files are, lazy safetensors, strict key/shape checks.

A component is found in a pipeline folder (``root/component``), in its own folder, or on the Hugging Face Hub
(a repo id; only that component's files are fetched). Loading a model is: read its folder's safetensors
lazily (``mx.load`` memory-maps them), let the model's ``sanitize`` fix the few layout differences, turn on
quantization for the layers the folder stores quantized (or quantize at load time when asked), and assign.
Nothing here knows a particular architecture: the models say what they need.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import quantize as Q
from . import sharding

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# safetensors dtype names -> bytes per element (for sizes computed from headers alone)
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# The file that marks each component's own folder (a pipeline root holds the component as a subfolder).
MARKERS = {"scheduler": "scheduler_config.json", "processor": "tokenizer.json", "tokenizer": "tokenizer_config.json"}


class WeightsError(ValueError):
    """A checkpoint that cannot be read as asked (missing, corrupt, wrong keys or shapes); one line for the user."""


def to_dtype(dtype) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    name = str(dtype).replace("torch.", "").replace("mlx.core.", "")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------------------
# Where a component is


def is_local(path_or_repo) -> bool:
    """A string that names a local path (it exists, starts with /, . or ~, or its first part is a folder here: a
    mistyped ``models/glm-imag``) is never sent to the Hub."""
    text = str(path_or_repo)
    return (isinstance(path_or_repo, os.PathLike) or Path(text).expanduser().exists() or text.startswith((".", "/", "~"))
            or ("/" in text and Path(text.split("/")[0]).is_dir()))


def check_repo_id(repo_id: str):
    """A name that is no local path must look like a Hub repo id (org/name)."""
    if repo_id.count("/") != 1:
        raise WeightsError(f"{repo_id} does not exist (expected a local folder or a Hugging Face repo id like org/name)")


def fetch(repo_id: str, patterns: list[str] | None) -> Path:
    """A snapshot of ``repo_id`` on the Hub holding the files that match ``patterns`` (all when None)."""
    check_repo_id(repo_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: one line for the user, with what to do
        detail = " ".join(str(e).split())[:300]
        raise WeightsError(f"could not fetch {repo_id} from the Hugging Face Hub ({type(e).__name__}: {detail}); check "
                           "the repo id and the network, or log in (hf auth login) for a gated repo") from None


def component_folder(path_or_repo, component: str, subfolder: str | None = None, files: str = "*") -> Path:
    """The one rule: ``root/component`` of a pipeline folder, the component's own folder, or the Hub's copy.

    ``subfolder`` (diffusers' argument) names the folder inside ``path_or_repo`` explicitly; from the Hub only
    the component's files matching ``files`` are fetched (``"*.json"``: its configs alone).
    """
    name = subfolder or component
    if not is_local(path_or_repo):
        root = fetch(str(path_or_repo), [f"{name}/{files}", "model_index.json"])
        if not (root / name).is_dir():
            raise WeightsError(f"{path_or_repo} has no folder {name!r}")
        return root / name
    path = Path(path_or_repo).expanduser()
    check_folder(path)
    if (path / name).is_dir():
        return path / name
    if subfolder is None and (path / MARKERS.get(component, "config.json")).is_file():
        return path
    raise WeightsError(f"{path} has no {name}/ folder")


def check_folder(path: Path):
    """A local path that must be a folder: one line when it is not."""
    if not path.is_dir():
        raise WeightsError(f"{path} does not exist" + _not_asked(path) if not path.exists() else f"{path} is not a folder")


def check_pipeline_folder(root: Path):
    """A local pipeline folder (diffusers layout, or converted): one line when it is not one."""
    check_folder(root)
    if not (root / "transformer").is_dir():
        raise WeightsError(f"{root} is not a GLM-Image pipeline folder (no transformer/ inside)")


def _not_asked(path: Path) -> str:
    """Why a path shaped like a repo id was not looked up on the Hub."""
    first = str(path).split("/")[0]
    return f" (not asked of the Hub: {first}/ is a folder here)" if str(path).count("/") == 1 and Path(first).is_dir() else ""


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return config


# ---------------------------------------------------------------------------------------------------------
# Weight files


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of one component: those named by an index json, else every *.safetensors."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_index(indexes[0])["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{f.name} is named by {indexes[0].name} but missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors weights in {folder}")
    return files


def read_index(path: Path) -> dict:
    """A ``*.safetensors.index.json``, checked: a weight_map from each weight to its file's name, and metadata (if
    any) an object; anything else is one line naming the file."""
    index = read_config(path.parent, path.name)
    if "weight_map" not in index:
        raise WeightsError(f"{path} has no weight_map (not a safetensors index)")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise WeightsError(f"{path}: weight_map must map each weight to a file name")
    if not isinstance(index.get("metadata", {}), dict):
        raise WeightsError(f"{path}: metadata must be an object")
    return index


def read_safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file, checked against the file's size (catches truncation)."""
    return _header(path)[1]


def _header(path: Path) -> tuple[int, dict]:
    """(where the tensor data starts, the tensor table) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    for key, info in header.items():
        _check_entry(path, key, info)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end != size:
        raise WeightsError(f"{path} is truncated or corrupt: {size} bytes, its header describes {8 + n + end}")
    return 8 + n, header


def _check_entry(path: Path, key: str, info) -> None:
    """One tensor of a header is {"dtype": name, "shape": [sizes], "data_offsets": [begin, end]}: what every reader
    of the table (sizes, shares, the converter's plan) indexes without looking."""

    def whole(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 0

    if not isinstance(info, dict):
        raise WeightsError(f"{path} is not a valid safetensors file (its entry {key} is not an object)")
    offsets = info.get("data_offsets")
    checks = {"dtype": isinstance(info.get("dtype"), str),
              "shape": isinstance(info.get("shape"), list) and all(map(whole, info["shape"])),
              "data_offsets": isinstance(offsets, list) and len(offsets) == 2 and all(map(whole, offsets))
              and offsets[0] <= offsets[1]}
    for field, ok in checks.items():
        if not ok:
            raise WeightsError(f"{path} is not a valid safetensors file ({key} has no valid {field})")


# safetensors dtypes a share is read in: numpy's type of the same width, and the MLX type to view it as
_SHARE_DTYPES = {"F32": ("float32", None), "F16": ("float16", None), "BF16": ("uint16", mx.bfloat16),
                 "U32": ("uint32", None), "U8": ("uint8", None), "I32": ("int32", None)}


def read_shares(folder: str | os.PathLike, wanted: dict[str, tuple[int, tuple]]) -> dict[str, mx.array]:
    """Slices of stored tensors, reading only their bytes (a memory map): ``wanted`` maps a key to (axis, ranges),
    the ranges concatenated along the axis (sharding.shares says which)."""
    import numpy as np

    out = {}
    for f in safetensors_files(folder):
        start, header = _header(f)
        for key in wanted.keys() & header.keys():
            info, (axis, ranges) = header[key], wanted[key]
            if info["dtype"] not in _SHARE_DTYPES:
                raise WeightsError(f"{f}: {key} is stored as {info['dtype']}, which a tensor split cannot read")
            np_dtype, view = _SHARE_DTYPES[info["dtype"]]
            stored = np.memmap(f, dtype=np_dtype, mode="r", offset=start + info["data_offsets"][0],
                               shape=tuple(info["shape"]))
            if any(b > stored.shape[axis] for _, b in ranges):
                raise WeightsError(f"{f}: {key} has shape {tuple(stored.shape)}, too small for the split's share")
            index = np.concatenate([np.arange(a, b) for a, b in ranges])
            piece = mx.array(np.take(stored, index, axis=axis))
            out[key] = piece.view(view) if view is not None else piece
            del stored
    missing = sorted(wanted.keys() - out.keys())
    if missing:
        raise WeightsError(f"{folder}: missing weights {', '.join(missing[:3])}")
    return out


def load_weights(folder: str | os.PathLike) -> dict[str, mx.array]:
    """All tensors of a component folder as lazy (memory-mapped) MLX arrays."""
    weights: dict[str, mx.array] = {}
    for f in safetensors_files(folder):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise WeightsError(f"cannot read {f}: {e}") from None
    return weights


def file_sha256(path: str | os.PathLike) -> str:
    """A file's SHA-256, read in 1 MiB blocks (condition images and adapters, for the metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a component's weights, nothing read: the index's total_size (present even when only the json
    files were fetched from the Hub), else the files' sizes."""
    for index in sorted(Path(folder).glob("*.safetensors.index.json")):
        total = read_index(index).get("metadata", {}).get("total_size")
        if isinstance(total, int):
            return total
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def cast_floating(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def check_keys(model, weights: dict[str, mx.array], where) -> None:
    """Name what is wrong in one line before MLX's own (longer) error would."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
            raise WeightsError(f"{where}: {what} weights {', '.join(keys[:3])}{more}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightsError(f"{where}: weight {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")


def load_into(model, folder, config: dict, dtype=None, weights: dict[str, mx.array] | None = None, split=None,
              quantized_later: tuple | None = None):
    """Load a component folder's weights into ``model`` (strict: every key present, every shape equal); with a
    tensor ``split``, only this rank's share of the model's planned layers (sharding.py); ``quantized_later``:
    (layers, group size) a load-time quantization will quantize, whose shares must hold whole groups."""
    weights = model.sanitize(load_weights(folder) if weights is None else weights)
    if config.get("quantization"):
        Q.apply_stored(model, config["quantization"], weights)
    if split is not None:
        plan = model.tensor_plan(model.config, split.size, split.rank)
        sharding.narrow(model, plan, *(quantized_later or ((), 0)))
        model.shard_heads(split.size)
        weights.update(read_shares(folder, sharding.shares(model, plan)))  # the lazy whole tensors are never read
    weights = cast_floating(weights, to_dtype(dtype))
    check_keys(model, weights, folder)
    model.load_weights(list(weights.items()), strict=True)
    return model


# What a config the model cannot take raises, from the config classes or the model's construction (a zero size
# divides somewhere: heads, widths, patch sizes).
_CONFIG_ERRORS = (TypeError, ValueError, KeyError, ArithmeticError)


def model_config(cls, config: dict, where):
    """``cls``'s config dataclass from a config.json, its quantization block (a converted folder's) checked; one
    line naming the file if it does not fit."""
    try:
        cfg = cls.config_class.from_dict(config)
    except _CONFIG_ERRORS as e:
        raise _config_error(cls, config, where, e) from None
    if config.get("quantization"):  # checked before any weight is read; load_into applies it
        try:
            Q.check_stored(config["quantization"])
        except Q.QuantizeError as e:
            raise WeightsError(f"{where}/config.json: {e}") from None
    return cfg


def build(cls, config: dict, where):
    """The model a config.json describes; a config the model cannot take is one line naming the file."""
    cfg = model_config(cls, config, where)
    try:
        return cls(cfg)
    except _CONFIG_ERRORS as e:
        raise _config_error(cls, config, where, e) from None


def _config_error(cls, config: dict, where, error: Exception) -> WeightsError:
    """The one line for a config ``cls`` cannot take. A division by zero names no key, so the config's zero or
    negative numbers are named beside it."""
    message = f"{where}/config.json does not describe a {cls.component}: {error}"
    suspects = _nonpositive_numbers(config)
    if isinstance(error, ArithmeticError) and suspects:
        message += f" (zero or negative: {', '.join(suspects)})"
    return WeightsError(message)


def _nonpositive_numbers(config: dict, prefix: str = "") -> list[str]:
    """The keys (nested ones dotted: text_config.num_attention_heads) whose value is an integer <= 0."""
    found = []
    for key, value in config.items():
        if isinstance(value, dict):
            found += _nonpositive_numbers(value, f"{prefix}{key}.")
        elif isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            found.append(prefix + key)
    return found


def load_model(cls, path_or_repo, subfolder: str | None = None, dtype=None, quantize=None, split=None):
    """A model of class ``cls`` (``models/``) from a pipeline folder (its ``cls.component/`` is used), the
    component's own folder, or a Hugging Face repo id (only this component's files are fetched), as mlx-lm's
    ``load_model``: find the component, build the model from its config, load its weights lazily (memory-mapped,
    read on first use), and quantize it by its own predicate when ``quantize`` (a QuantSpec or bits) is given and
    the folder is not quantized already. A ``generation_config.json`` beside the weights becomes
    ``model.generation_config``. With a tensor ``split`` (sharding.Split) this rank holds its share of the
    model's planned layers."""
    folder = component_folder(path_or_repo, cls.component, subfolder)
    config = read_config(folder)
    model = build(cls, config, folder)
    dtype = cls.load_dtype(model.config, to_dtype(dtype))
    spec = Q.as_spec(quantize) if quantize and not config.get("quantization") else None
    # which layers to quantize is decided on the whole model's widths, so that every rank's split agrees with one process
    layers = Q.quantizable_layers(model, spec.group_size)[0] if spec else None
    load_into(model, folder, config, dtype=dtype, split=split, quantized_later=(layers, spec.group_size) if spec else None)
    if spec:
        Q.quantize_model(model, spec, layers)
    if split is not None:
        sharding.connect(model, model.tensor_plan(model.config, split.size, split.rank), split)
    model.after_load()
    if hasattr(model, "generation_config") and (folder / "generation_config.json").is_file():
        model.generation_config = read_config(folder, "generation_config.json")
    return model

