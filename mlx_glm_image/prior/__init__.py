"""The AR prior model of GLM-Image (transformers' ``GlmImageForConditionalGeneration``) in MLX."""

from .config import GlmImageConfig, TextConfig, VisionConfig, VQConfig
from .model import GlmImageForConditionalGeneration
from .processor import GlmImageProcessor
from .sampling import generate, generate_prior_tokens
from .text_model import KVCache

__all__ = [
    "GlmImageConfig",
    "TextConfig",
    "VisionConfig",
    "VQConfig",
    "GlmImageForConditionalGeneration",
    "GlmImageProcessor",
    "KVCache",
    "generate",
    "generate_prior_tokens",
]
