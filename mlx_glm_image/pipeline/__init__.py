"""The pipeline side: ``GlmImagePipeline`` holds the components and runs the stages (prior tokens, glyphs,
denoising, decoding), each in its own module here."""

from .pipeline import GlmImagePipeline, GlmImagePipelineOutput

__all__ = ["GlmImagePipeline", "GlmImagePipelineOutput"]
