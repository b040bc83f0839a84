"""What the frozen models compute for each training example, computed once and kept on disk.

The AR target trains on each example's sequence (train/ar.py: the prompt's tokens, the source images' VQ tokens,
the grids the model should write, with positions and labels); the DiT target on the image's VAE latents, its prior
tokens and its prompt's glyph embeddings (train/dit.py). These are functions of the example and the frozen weights
alone, so they are computed once per example and stored in a cache folder, one safetensors file each, named by a
hash of everything they depend on: the example's content (the image and source files' bytes, the prompt, the
training size), the models that encode it (each component's configs and its weight files' names, sizes and
modification times), the compute dtype, the quantization of a model that encodes, and ``VERSION``. A second run over
the same data starts training at once; a changed image, prompt or model is encoded again. Each file is written whole
(atomic.py), so a stopped run leaves no half file, and runs may share a cache.

The encoders are loaded only for what the cache lacks, and freed before training (``release``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from .. import atomic, loading
from .data import Example

VERSION = 1  # of the encodings' definition: a change of what is computed must change it

# The components each target's encodings read (the trained model of the AR target encodes its own targets).
ENCODERS = {"ar": ("vision_language_encoder", "processor"),
            "dit": ("vision_language_encoder", "processor", "vae", "text_encoder", "tokenizer")}


def default_folder() -> Path:
    """``$MLX_GLM_IMAGE_CACHE/encodings``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/mlx-glm-image/encodings``."""
    if os.environ.get("MLX_GLM_IMAGE_CACHE"):
        return Path(os.environ["MLX_GLM_IMAGE_CACHE"]).expanduser() / "encodings"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mlx-glm-image" / "encodings"


def component_identity(source, name: str) -> str:
    """What names a component's weights without reading them: its JSON files' contents and its other files'
    names, sizes and modification times."""
    try:
        folder = loading.component_folder(source, name, files="*")
    except loading.WeightsError:
        return "absent"  # a tokenizer that needs no file
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        if path.suffix == ".json":
            h.update(path.read_bytes())
        else:
            stat = path.stat()
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What, besides an example, its encodings depend on."""

    target: str
    models: dict  # component name -> component_identity
    dtype: str
    quantize: int | None  # of the model that encodes (the AR target's trained model)

    @classmethod
    def of(cls, config) -> Settings:
        return cls(target=config.target, models={n: component_identity(config.model, n) for n in ENCODERS[config.target]},
                   dtype=config.dtype, quantize=config.quantize if config.target == "ar" else None)

    def key(self, example: Example) -> str:
        """The example's cache key: a hash of its content and these settings."""
        content = {"version": VERSION, **dataclasses.asdict(self), "prompt": example.prompt,
                   "size": [example.height, example.width], "image": file_digest(example.image),
                   "source": None if example.source is None else file_digest(example.source)}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class Cache:
    """The encodings of one target in ``folder``, by key: arrays in a safetensors file, the rest in its metadata."""

    def __init__(self, folder: Path):
        self.folder = Path(folder).expanduser()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> tuple[dict, dict] | None:
        """(arrays, values) stored under ``key``, or None; a file that cannot be read counts as absent."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            arrays, metadata = mx.load(str(path), return_metadata=True)
            return arrays, json.loads(metadata.get("values", "{}"))
        except (RuntimeError, ValueError, OSError):
            return None

    def put(self, key: str, arrays: dict, values: dict):
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(self.path(key)) as tmp:
            # MLX names the file by its suffix: a temporary without one gets ".safetensors" added
            written = tmp.with_name(tmp.name + ".safetensors")
            mx.save_safetensors(str(written), arrays, metadata={"values": json.dumps(values)})
            os.replace(written, tmp)


def as_stored(encoding) -> tuple[dict, dict]:
    """A dataclass of encodings (train/ar.py's ArExample, train/dit.py's DitExample) as (arrays, values): its
    array fields, and the others (numbers, tuples, nested dataclasses) as JSON values."""
    arrays, values = {}, {}
    for f in dataclasses.fields(encoding):
        value = getattr(encoding, f.name)
        if isinstance(value, (mx.array, np.ndarray)):
            arrays[f.name] = mx.array(value)
        elif value is not None:
            values[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return arrays, values


def encodings(examples: list[Example], *, cache: Cache, settings: Settings, encode: Callable[[Example], object],
              rebuild: Callable[[dict, dict], object], progress: Callable[[int, int], None] | None = None) -> list:
    """Each example's encodings: from the cache, else ``encode(example)``, stored there. Both come back through
    ``rebuild(arrays, values)`` (so a run computes with what a later run reads); ``progress(done, total)`` after
    each example encoded."""
    keys = [settings.key(e) for e in examples]
    stored = [cache.get(key) for key in keys]
    missing = [i for i, s in enumerate(stored) if s is None]
    for n, i in enumerate(missing, 1):
        arrays, values = as_stored(encode(examples[i]))
        mx.eval(arrays)
        cache.put(keys[i], arrays, values)
        stored[i] = (arrays, json.loads(json.dumps(values)))
        if progress:
            progress(n, len(missing))
    return [rebuild(*s) for s in stored]
