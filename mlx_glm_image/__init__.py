"""GLM-Image in MLX.

The public names are imported on first use, so that the commands start without MLX: a Ctrl-C in their first
moments meets their own handler, not an import in progress."""

import importlib

__version__ = "0.2.0"

_WHERE = {
    "AutoencoderKL": "models",
    "DBCacheConfig": "pipeline.step_cache",
    "GlmImageForConditionalGeneration": "models",
    "GlmImageKVCache": "models",
    "GlmImagePipeline": "pipeline",
    "GlmImagePipelineOutput": "pipeline",
    "GlmImageTransformer2DModel": "models",
    "T5EncoderModel": "models",
    "TaylorSeerCalibratorConfig": "pipeline.step_cache",
    "load_model": "loading",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
