"""Reading diffusers / transformers / converted MLX component folders.

Every model module builds its parameters with the reference's names, so loading is: read the folder's
safetensors lazily (``mx.load`` memory-maps them), let the model's ``sanitize`` fix the few layout
differences, turn on quantization for the layers that the folder stores quantized, and assign.
Nothing here knows about a particular architecture.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# safetensors dtype names -> bytes per element (for sizes computed from headers alone)
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


class WeightsError(ValueError):
    """A checkpoint folder that cannot be read as asked (missing, corrupt, wrong keys or shapes)."""


def config_from_dict(cls, config: dict, exclude: tuple[str, ...] = ()):
    """A config dataclass from a config.json dict; the reference's other keys (_class_name, ...) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return cls(**{k: v for k, v in config.items() if k in names})


def to_dtype(dtype) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    name = str(dtype).replace("torch.", "").replace("mlx.core.", "")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve(path_or_repo: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local component folder, or one fetched from the Hugging Face Hub (only that subfolder's files)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise WeightsError(f"{folder} is not a folder")
        return folder
    text = str(path_or_repo)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise WeightsError(f"{text} does not exist (expected a local folder or a Hugging Face repo id like org/name)")
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*", "model_index.json"] if subfolder else None
    try:
        root = Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise WeightsError(f"could not fetch {text} from the Hugging Face Hub: {type(e).__name__}: {e}") from None
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise WeightsError(f"{text} has no folder {subfolder!r}")
    return folder


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from None


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of one component: those named by an index json, else every *.safetensors."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{indexes[0]} is not a safetensors index: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{f.name} is named by {indexes[0].name} but missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors weights in {folder}")
    return files


def read_safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file, checked against the file's size (catches truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not a valid safetensors file ({e})") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end != size:
        raise WeightsError(f"{path} is truncated or corrupt: {size} bytes, its header describes {8 + n + end}")
    return header


def load_weights(folder: str | os.PathLike) -> dict[str, mx.array]:
    """All tensors of a component folder as lazy (memory-mapped) MLX arrays."""
    weights: dict[str, mx.array] = {}
    for f in safetensors_files(folder):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise WeightsError(f"cannot read {f}: {e}") from None
    return weights


def cast_floating(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def quantize_predicate(quantization: dict, weights: dict[str, mx.array]) -> Callable:
    """Quantize exactly the layers stored quantized, with their per-layer overrides (mlx-lm's config form)."""

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        if isinstance(override, dict):
            return {k: override[k] for k in ("bits", "group_size", "mode") if k in override}
        return True

    return predicate


def load_into(
    model: nn.Module,
    folder: str | os.PathLike,
    config: dict,
    dtype=None,
    sanitize: Callable[[dict], dict] | None = None,
    weights: dict[str, mx.array] | None = None,
) -> nn.Module:
    """Load a component folder's weights into ``model`` (strict: every key present, every shape equal)."""
    if weights is None:
        weights = load_weights(folder)
    if sanitize is not None:
        weights = sanitize(weights)
    quantization = config.get("quantization")
    if quantization:
        nn.quantize(
            model,
            group_size=quantization.get("group_size"),
            bits=quantization.get("bits"),
            mode=quantization.get("mode", "affine"),
            class_predicate=quantize_predicate(quantization, weights),
        )
    weights = cast_floating(weights, to_dtype(dtype))
    check_keys(model, weights, folder)
    model.load_weights(list(weights.items()), strict=True)
    return model


def check_keys(model: nn.Module, weights: dict[str, mx.array], where) -> None:
    """Name what is wrong in one line before MLX's own (longer) error would."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise WeightsError(f"{where}: missing weights {', '.join(missing[:3])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise WeightsError(f"{where}: unexpected weights {', '.join(unexpected[:3])}{more}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightsError(
                f"{where}: weight {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )


# ---------------------------------------------------------------------------------------------------------
# Quantization policy, one place for the converter and for quantizing at load time. Full precision stays
# for norms, convolutions and biases (not matmuls), the small embedding tables, the conditioning and
# input/output layers whose error reaches every token, and (by default) the small or precision-sensitive
# components. Layers whose input width is not a multiple of the group size cannot be quantized.


@dataclass(frozen=True)
class QuantPolicy:
    by_default: bool  # quantized by -q unless the user names the components
    keep: tuple[str, ...] = ()  # module path prefixes kept in full precision
    why: str = ""


QUANT_POLICY = {
    "transformer": QuantPolicy(
        True,
        keep=("time_condition_embed", "image_projector", "norm_out", "proj_out", "prior_token_embedding"),
        why="timestep/size conditioning, the patch in/out projections and the prior-token table stay full precision",
    ),
    "vision_language_encoder": QuantPolicy(
        True,
        keep=("model.vqmodel", "model.visual.patch_embed", "model.visual.embeddings"),
        why="the VQ codebook and the vision patch/position embeddings stay full precision",
    ),
    "text_encoder": QuantPolicy(False, why="ByT5 is small (0.9 GB) and decides the rendered glyphs"),
    "vae": QuantPolicy(False, why="convolutions only (0.8 GB)"),
}


def quantizable_layers(model: nn.Module, policy: QuantPolicy, group_size: int) -> tuple[set[str], dict[str, str]]:
    """(layers to quantize, {layer: why not} for the matmul/embedding layers left in full precision)."""
    chosen, kept = set(), {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if any(path == k or path.startswith(k + ".") for k in policy.keep):
            kept[path] = "kept by policy"
        elif isinstance(module, nn.Embedding) and not path.endswith("embed_tokens"):
            kept[path] = "embedding"  # the AR token table (1.4 GB, read a row per token) is the exception
        elif module.weight.shape[-1] % group_size:
            kept[path] = f"input width {module.weight.shape[-1]} not a multiple of {group_size}"
        else:
            chosen.add(path)
    return chosen, kept


def quantize_in_memory(model: nn.Module, component: str, bits: int, group_size: int = 64, mode: str = "affine") -> dict:
    """Quantize a loaded full-precision model by the policy (what convert does, without writing files)."""
    chosen, kept = quantizable_layers(model, QUANT_POLICY[component], group_size)
    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=lambda p, m: p in chosen)
    return {"bits": bits, "group_size": group_size, "mode": mode, **{k: False for k in sorted(kept)}}
