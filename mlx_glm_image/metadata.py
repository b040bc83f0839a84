"""The metadata that regenerates an image, both ways in this one module: ``record`` makes it (every setting of the
name table, pipeline/request.py, by its metadata key; the run's model, quantization and dtype; what made it),
``write`` puts it in the PNG (a "glm-image" text chunk holding JSON, beside a human-readable "parameters") and,
when asked, in a JSON file beside it, and ``read`` takes it back for ``--config-from-metadata``.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from . import atomic, loading
from .pipeline.checks import check_kind
from .pipeline.request import SETTINGS, Request

CHUNK = "glm-image"  # the PNG text chunk that holds the JSON record
RUN_KEYS = ("model", "quantize", "dtype", "lora")  # the pipeline's settings a record carries (and --config-from-metadata reads)
RUN_TYPES = {"model": str, "quantize": int, "dtype": str, "lora": list}


def run_record(pipe) -> dict:
    """What a pipeline contributes to each record: how it was asked for, and what it loaded."""
    from .loading import DTYPES

    components = pipe.components
    source = str(components.source)
    # a local folder is recorded resolved, so that the record regenerates from any folder; as given too
    model = str(Path(source).expanduser().resolve()) if loading.is_local(source) else source
    return {"model": model, "model_given": source, "quantize": components.quantize.bits if components.quantize else None,
            "dtype": next(name for name, dtype in DTYPES.items() if dtype == components.dtype),
            "quantization": components.quantization(), "revision": components.revision(),
            "lora": components.adapter_records()}


def record(request: Request, run: dict, index: int = 0) -> dict:
    """Everything that changes the pixels of image ``index`` of a request, and what made them."""
    import mlx.core as mx

    from . import __version__

    out = {s.key: s.to_json(request.value(s)) for s in SETTINGS if s.recorded and s.name not in ("prompt", "image")}
    prompts = request.prompt or (None,)
    out = {"prompt": prompts[index // request.num_images_per_prompt], **out}
    out["image"] = [{"path": str(Path(p).expanduser().resolve()), "sha256": loading.file_sha256(p)} for p in request.image_files]
    out.update(run)
    out["versions"] = {"mlx-glm-image": __version__, "mlx": mx.__version__}
    out["device"] = f"{mx.default_device()} ({platform.machine()}, {platform.system()})"
    return out


def png_info(record: dict):
    from PIL.PngImagePlugin import PngInfo

    from . import __version__

    info = PngInfo()
    info.add_text("prompt", record["prompt"])
    info.add_text("parameters", f"model={record['model']}, size={record['width']}x{record['height']}, steps={record['steps']}, "
                                f"guidance={record['guidance']}, seed={record['seed']}")
    info.add_text(CHUNK, json.dumps(record, ensure_ascii=False))
    info.add_text("Software", f"mlx-glm-image {__version__}")
    return info


def write(image, path: Path, record: dict, png_text: bool = True, sidecar: bool = False, overwrite: bool = True):
    """The PNG (with the record in it unless ``png_text`` is False) and, with ``sidecar``, the record as JSON
    beside it; each written to a temporary file and renamed (atomic.py). Without ``overwrite`` an existing PNG
    (even one another process wrote a moment ago) raises FileExistsError, and nothing is written."""
    with atomic.replacing(path, exclusive=not overwrite) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(record) if png_text else None)
    if sidecar:
        with atomic.replacing(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")


def read(path: str) -> dict:
    """The settings recorded in a PNG (its text chunk) or in a JSON sidecar: {metadata key: value}."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--config-from-metadata {path} does not exist")
    try:
        if p.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(p) as im:
                text = im.text.get(CHUNK)
            if text is None:
                raise ValueError(f"--config-from-metadata {path} has no mlx-glm-image metadata")
            data = json.loads(text)
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--config-from-metadata {path} cannot be read: {e}") from None
    if not isinstance(data, dict) or "prompt" not in data:
        raise ValueError(f"--config-from-metadata {path} is not mlx-glm-image metadata")
    images = data.get("image") or []
    data["image"] = [i.get("path") if isinstance(i, dict) else i for i in images] if isinstance(images, list) else images
    try:
        settings = {s.key: s.from_json(data[s.key]) for s in SETTINGS if s.recorded and s.key in data}
        for key, kind in RUN_TYPES.items():
            if data.get(key) is not None:
                check_kind(key, data[key], kind)
    except ValueError as e:
        raise ValueError(f"--config-from-metadata {path}: {e}") from None
    return {**settings, **{k: data[k] for k in RUN_KEYS if k in data}}
