"""The metadata format, both ways in this one module: ``write`` puts an image's record (pipeline/record.py
assembles it) in the PNG (a "glm-image" text chunk holding JSON, beside a human-readable "parameters") and, when
asked, in a JSON file beside it, and ``read`` takes it back for ``--config-from-metadata``: every setting of the
name table (pipeline/request.py) by its metadata key, and the run's model, quantization, dtype and adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import atomic
from .pipeline.checks import check_kind
from .pipeline.request import SETTINGS

CHUNK = "glm-image"  # the PNG text chunk that holds the JSON record
RUN_KEYS = ("model", "quantize", "dtype", "lora")  # the pipeline's settings a record carries (and --config-from-metadata reads)
RUN_TYPES = {"model": str, "quantize": int, "dtype": str, "lora": list}


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
