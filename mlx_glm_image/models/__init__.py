"""The four models of GLM-Image, pure ``nn.Module``s: no file or Hub access, no pipeline logic, no evaluation."""

from .ar import GlmImageForConditionalGeneration
from .dit import GlmImageKVCache, GlmImageTransformer2DModel
from .t5 import T5EncoderModel
from .vae import AutoencoderKL

__all__ = ["AutoencoderKL", "GlmImageForConditionalGeneration", "GlmImageKVCache", "GlmImageTransformer2DModel",
           "T5EncoderModel"]
