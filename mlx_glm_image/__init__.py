"""GLM-Image in MLX."""

from . import loading  # installs from_pretrained on the models  # noqa: F401
from .models import AutoencoderKL, GlmImageForConditionalGeneration, GlmImageKVCache, GlmImageTransformer2DModel
from .models import T5EncoderModel
from .pipeline import GlmImagePipeline, GlmImagePipelineOutput
from .pipeline.step_cache import DBCacheConfig, TaylorSeerCalibratorConfig

__version__ = "0.2.0"

__all__ = [
    "AutoencoderKL",
    "DBCacheConfig",
    "GlmImageForConditionalGeneration",
    "GlmImageKVCache",
    "GlmImagePipeline",
    "GlmImagePipelineOutput",
    "GlmImageTransformer2DModel",
    "T5EncoderModel",
    "TaylorSeerCalibratorConfig",
]
