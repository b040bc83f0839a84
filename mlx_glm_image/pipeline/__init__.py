"""The pipeline side: ``GlmImagePipeline`` holds the components and runs the stages (prior tokens, glyphs,
denoising, decoding), each in its own module here; a call is one ``Request``; a run tells its ``Event``s."""

from .events import Event
from .pipeline import GlmImagePipeline, GlmImagePipelineOutput
from .request import Request, Sampling, Schedule

__all__ = ["Event", "GlmImagePipeline", "GlmImagePipelineOutput", "Request", "Sampling", "Schedule"]
