"""The AR prior model of GLM-Image (transformers' ``GlmImageForConditionalGeneration``) in MLX."""

from .config import GlmImageConfig, TextConfig, VisionConfig, VQConfig
from .model import GlmImageForConditionalGeneration
from .text_model import KVCache

__all__ = ["GlmImageConfig", "TextConfig", "VisionConfig", "VQConfig", "GlmImageForConditionalGeneration", "KVCache"]
