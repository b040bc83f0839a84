"""What a checkpoint says about itself, without its weights: ``CheckpointFacts``, what ``Request.from_call`` checks
and resolves a call against (the size rule, the largest side, the DiT's blocks, the AR sampling defaults, the AR
sequence's length limit, the fitting of condition images), read once from the config files and the processor
(``CheckpointFacts.read``), or made from plain values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from .. import loading
from . import checks
from .image_processor import fit_condition_image, image_size, to_rgb
from .processor import GlmImageProcessor

# transformers' GenerationConfig defaults, for the keys a generation_config.json leaves out
DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
# GLM-Image's published sampling settings (docs/checkpoint.md), for a checkpoint without generation_config.json
PUBLISHED = {"temperature": 0.9, "top_k": 0, "top_p": 0.75}
AR = "vision_language_encoder"


def sampling_settings(generation_config: dict | None, temperature=None, top_p=None, top_k=None) -> dict:
    """The AR sampling settings a run uses: the ones given, else the checkpoint's generation_config.json (with
    transformers' defaults for what it leaves out), else GLM-Image's published ones."""
    gen = dict(DEFAULTS if generation_config else PUBLISHED)
    gen.update({k: v for k, v in (generation_config or {}).items() if k in DEFAULTS and v is not None})
    gen.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None})
    return gen


@dataclass(frozen=True, kw_only=True)
class CheckpointFacts:
    """What ``Request.from_call`` asks of a checkpoint. Without an AR model (or its processor) there is no
    largest side, no length check and the published sampling settings; the stage that needs it says so."""

    size_multiple: int  # heights and widths are multiples of this: the AR model's token grid is half the DiT's
    max_side: int | None  # the largest image side the AR model takes (its vision config's image_size)
    dit_blocks: int  # the DiT's transformer blocks (the step cache's F and B count them)
    generation_config: dict = field(default_factory=dict)  # the AR model's generation_config.json, {} without one
    max_position_embeddings: int | None = None  # the AR text model's: its whole sequence fits in it
    # the AR model's tokenizer, chat template and image sizes: read when a call first needs them (a call with its
    # prior tokens given fetches no processor from the Hub)
    read_processor: Callable[[], GlmImageProcessor | None] = lambda: None

    @classmethod
    def read(cls, components) -> "CheckpointFacts":
        """From a pipeline's ``Components``: their configs (a given or loaded model's own, else config.json) and
        the processor; no weight is read."""
        ar = None
        if components.holds(AR) or not components.missing([AR]):
            try:
                ar = components.config(AR)
            except loading.WeightsError:  # a Hub repo without it: not part of this pipeline
                pass
        return cls(
            size_multiple=components.vae_scale_factor * components.patch_size * 2,
            max_side=ar.vision_config.image_size if ar is not None else None,
            dit_blocks=components.config("transformer").num_layers,
            generation_config=_generation_config(components) if ar is not None else {},
            max_position_embeddings=ar.text_config.max_position_embeddings if ar is not None else None,
            read_processor=lambda: None if components.missing(["processor"]) else components.get("processor"))

    @cached_property
    def processor(self) -> GlmImageProcessor | None:
        return self.read_processor()

    def sampling_settings(self, temperature=None, top_p=None, top_k=None) -> dict:
        return sampling_settings(self.generation_config, temperature, top_p, top_k)

    def check_prompt_length(self, prompts, height: int, width: int, images=None):
        """Each prompt's AR sequence (its tokens, its condition images', the grids it writes) fits the model's
        max_position_embeddings; counted with the tokenizer, without preprocessing any image."""
        if self.processor is None or self.max_position_embeddings is None:
            return  # the stage that needs them says so
        for prompt, sample in zip(prompts, images or [()] * len(prompts)):
            sizes = [image_size(im) for im in sample]
            length = self.processor.sequence_length(prompt, height, width, sizes)
            checks.check_sequence_length(length, self.max_position_embeddings)

    def prepare_condition_images(self, images: list[list]) -> list[list]:
        """RGB, resized once to what both the VAE and the AR model's vision encoder take (image_processor.py)."""
        if self.processor is None:
            raise loading.WeightsError("this pipeline has no processor to fit the condition images to its AR model")
        ip = self.processor.image_processor
        return [[fit_condition_image(to_rgb(im), self.size_multiple, ip.shortest_edge, ip.longest_edge) for im in sample]
                for sample in images]


def _generation_config(components) -> dict:
    """The AR model's generation_config.json ({} without one): the held model's, else the file's."""
    model = components.held(AR)
    if model is not None:
        return model.generation_config
    path = components.folder(AR, files="*.json") / "generation_config.json"
    return loading.read_config(path.parent, path.name) if path.is_file() else {}
