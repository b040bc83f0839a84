"""The metadata record that regenerates an image, assembled here and nowhere else: every setting of the name table
(request.py) by its metadata key, what the pipeline loaded (model, quantization, dtype, adapters), what made it
(versions, device, the processes it was split over) and, when the step cache ran, its decisions. ``metadata.py``
writes it into the PNG and the JSON sidecar and reads it back; nothing here writes a file.
"""

from __future__ import annotations

import platform
from pathlib import Path

from .. import loading
from .request import SETTINGS, Request


def run_record(components, placement) -> dict:
    """What the pipeline's components contribute to each record: how they were asked for, what they loaded, and
    where the work went (``placement``, parallel.py: a tensor split changes the rounding)."""
    source = str(components.source)
    # a local folder is recorded resolved, so that the record regenerates from any folder; as given too
    model = str(Path(source).expanduser().resolve()) if loading.is_local(source) else source
    return {"model": model, "model_given": source, "quantize": components.quantize.bits if components.quantize else None,
            "dtype": next(name for name, dtype in loading.DTYPES.items() if dtype == components.dtype),
            "quantization": components.quantization(), "revision": components.revision(),
            "lora": components.adapters.records(), "parallel": placement.record()}


def image_record(request: Request, run: dict, index: int = 0, cache_summary: dict | None = None) -> dict:
    """Everything that changes the pixels of image ``index`` of a request (``run``: ``run_record``'s), what made
    them, and the step cache's ``cache_summary`` when it was on."""
    import mlx.core as mx

    from .. import __version__

    out = {s.key: s.to_json(request.value(s)) for s in SETTINGS if s.recorded and s.name not in ("prompt", "image")}
    prompts = request.prompt or (None,)
    out = {"prompt": prompts[index // request.num_images_per_prompt], **out}
    out["image"] = [{"path": str(Path(p).expanduser().resolve()), "sha256": loading.file_sha256(p)} for p in request.image_files]
    out.update(run)
    out["versions"] = {"mlx-glm-image": __version__, "mlx": mx.__version__}
    out["device"] = f"{mx.default_device()} ({platform.machine()}, {platform.system()})"
    if cache_summary is not None:
        out["cache_summary"] = cache_summary
    return out
