"""The metadata format, both ways in this one module: ``write`` puts an image's record (pipeline/record.py
assembles it) in the PNG (a "glm-image" text chunk holding JSON, beside a human-readable "parameters") and, when
asked, in a JSON file beside it, and ``read`` takes it back for ``--config-from-metadata``: every setting of the
name table (pipeline/request.py) by its metadata key, the run's model, quantization, dtype and adapters, and where
the image was made ("parallel", compared with the new run's placement, never taken as its setting).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import atomic
from .pipeline.checks import check_kind, is_kind
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


def write(image, path: Path, record: dict, png_text: bool = True, sidecar: bool = False, overwrite: bool = True,
          on_commit=None):
    """The PNG (with the record in it unless ``png_text`` is False) and, with ``sidecar``, the record as JSON
    beside it (``sidecar_path``): one unit, both made under temporary names and put in place together, the JSON
    first (atomic.replacing_together), so that an image in place always has its JSON, and an interruption leaves
    both or neither. Without ``overwrite`` neither name may exist (even one another process wrote a moment ago):
    FileExistsError names the one that does, and nothing is written. ``on_commit`` runs once both are in place."""
    names = ([sidecar_path(path)] if sidecar else []) + [path]
    with atomic.replacing_together(names, exclusive=not overwrite, on_commit=on_commit) as tmps:
        if sidecar:
            tmps[0].write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        image.save(tmps[-1], format="PNG", pnginfo=png_info(record) if png_text else None)


def sidecar_path(path: Path) -> Path:
    """Where ``--metadata`` writes an image's record: NAME.json beside NAME.png."""
    return path.with_suffix(".json")


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
        check_lora_records(data.get("lora") or [])
        check_placement_record(data.get("parallel"))
    except ValueError as e:
        raise ValueError(f"--config-from-metadata {path}: {e}") from None
    # where it was made is not a setting (the run's flags and mlx.launch decide that): compared, not taken
    placement = {"parallel": data["parallel"]} if "parallel" in data else {}
    return {**settings, **{k: data[k] for k in RUN_KEYS if k in data}, **placement}


def check_lora_records(records: list):
    """The adapters a record names, as --config-from-metadata loads them: each an object with its source (text)
    and its scale (a finite number: lora.check_scale); its name and SHA-256, when there, text."""
    from .lora import check_scale
    from .pipeline.checks import described

    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"lora[{i}] must be an object, got {described(record)}")
        check_kind(f"lora[{i}].source", record.get("source"), str)
        check_scale(record.get("scale"), f"lora[{i}].scale")
        for key in ("name", "sha256"):
            if record.get(key) is not None:
                check_kind(f"lora[{i}].{key}", record[key], str)


def check_placement_record(record):
    """Where a record says its image was made ("parallel"): null (one process) or an object with the mode and the
    number of processes, as pipeline/parallel.py records it."""
    from .pipeline.checks import described
    from .pipeline.parallel import MODES

    if record is None:
        return
    if not isinstance(record, dict):
        raise ValueError(f"parallel must be null or an object, got {described(record)}")
    if record.get("mode") not in MODES:
        raise ValueError(f"parallel.mode must be one of {', '.join(MODES)}, got {described(record.get('mode'))}")
    ranks = record.get("ranks")
    if not (is_kind(ranks, int) and ranks >= 2):
        raise ValueError(f"parallel.ranks must be an integer of 2 or more, got {described(ranks)}")
