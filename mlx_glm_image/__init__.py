"""GLM-Image in MLX."""

from .transformer import GlmImageKVCache, GlmImageTransformer2DModel

__version__ = "0.1.0"

__all__ = ["GlmImageKVCache", "GlmImageTransformer2DModel"]
