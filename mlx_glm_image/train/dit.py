"""The DiT target: flow matching on an image's VAE latents, conditioned as inference conditions the DiT.

An example's frozen encodings are made by inference's own functions: the image's latents as the pipeline encodes a
condition image (the VAE's posterior mean, normalized with latents_mean / latents_std: stages.encode_latents; the
mean, not a sample, so that the encoding is a function of the image that the data cache can keep, and the image the
DiT learns is the one the pipeline's own encoder gives), its prior tokens (the target grid's VQ codes, train/ar.py's
``target_codes``, upsampled 2x to the DiT's token grid as the prior stage upsamples the AR model's grid) and the glyph
embeddings of its prompt with those of the empty prompt (glyphs.encode_prompt: the conditional and unconditional
passes' text).

An editing example also holds its source image as an editing request gives it to the DiT: the condition latents and
pixel size of stages' ``_encode_condition_images`` and the prior token ids of prior_grid's ``_add_source_images``
(the source's VQ grid upsampled 2x, with its (1, 2h, 2w) grid). The source is the condition image as the request
holds it, fitted (CheckpointFacts.prepare_condition_images: each side a multiple of 32 within the AR processor's
bounds), so the AR processor only halves it and its VQ grid is H/32 x W/32: train/ar.py's ``target_codes`` at the
source's own size gives the pipeline's codes; the VAE encodes it whole.

The loss is mlx-examples flux's ``training_loss`` on GLM-Image's sampler (pipeline/flow.py): a timestep drawn
uniformly over the training timesteps with its sigma on inference's shifted schedule for the image's size
(``random_timesteps``; the DiT reads the timestep minus one), ``x_t = sampler.add_noise(x0, noise, sigma)``, the DiT's
velocity at ``x_t`` against ``noise - x0``, the mean squared error in float32. With probability ``drop`` a batch is
trained unconditioned, with exactly the inputs of inference's unconditional pass (the empty prompt's glyphs and
every prior embedding dropped), so classifier-free guidance keeps working. The draw is per batch, not per example:
a mixed batch would need the dropped rows' glyphs padded to the kept rows' length, which the unconditional pass
never sees.

An editing batch first writes the condition images' KV cache by inference's own ``write_condition_cache`` (one DiT
pass per source: timestep 0, no text, the source's prior tokens), inside the loss, so the adapters learn through that
pass too (as PEFT's do under torch's autograd); the conditional pass reads it. The unconditional pass skips the cache
at inference (denoise.Stepper), so a dropped batch writes none: its gradient through that pass would be zero.

The adapter is saved as diffusers' ``save_lora_adapter`` writes it (``lora.save_diffusers``), so ``--lora`` and
diffusers' ``load_lora_adapter`` read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from ..pipeline.denoise import write_condition_cache
from ..pipeline.flow import SAMPLERS
from ..pipeline.glyphs import encode_prompt, left_padded
from ..pipeline.image_processor import VaeImageProcessor, load_image, to_rgb
from ..pipeline.prior_grid import upsample_token_ids
from ..pipeline.stages import encode_latents

CODE_PIXELS = 32  # a fitted condition image's pixels per VQ code (per side): the AR grid is 1/32 of it


@dataclass(frozen=True, kw_only=True)
class DitExample:
    """What the frozen models give for one image of ``height`` x ``width`` pixels (batch 1 each)."""

    latents: mx.array  # (1, C, H/8, W/8) normalized
    prior_token_ids: mx.array  # (1, N) int32 on the DiT's token grid
    prompt_embeds: mx.array  # (1, L, text_embed_dim): the prompt's glyphs
    negative_prompt_embeds: mx.array  # (1, L0, text_embed_dim): the empty prompt's (the unconditional pass)
    height: int
    width: int
    # editing: the source image as write_condition_cache reads it (None for text-to-image)
    condition_latents: mx.array | None = None  # (1, C, h/8, w/8) normalized
    condition_size: tuple[int, int] | None = None  # (h, w) pixels
    prior_token_image_ids: mx.array | None = None  # (1, (h/16) * (w/16)) int32: its VQ grid upsampled 2x
    source_image_grid_thw: mx.array | None = None  # (1, 3) int32: (1, h/16, w/16)


@dataclass(frozen=True, kw_only=True)
class DitBatch:
    """Examples of one size, stacked as the DiT reads them (the glyphs left-padded as a batch of prompts is); for
    editing, their sources of one size (the cached condition lengths must agree to be batched)."""

    latents: mx.array
    prior_token_ids: mx.array
    prompt_embeds: mx.array
    negative_prompt_embeds: mx.array
    target_size: mx.array  # (B, 2) pixels
    crop_coords: mx.array  # (B, 2): zeros, the pipeline's default
    condition_latents: mx.array | None = None  # (B, C, h/8, w/8)
    condition_size: tuple[int, int] | None = None
    prior_token_image_ids: mx.array | None = None  # (B, (h/16) * (w/16))
    source_image_grid_thw: mx.array | None = None  # (1, 3), every example's

    @classmethod
    def of(cls, examples: list[DitExample]) -> DitBatch:
        sizes = {(e.height, e.width) for e in examples}
        if len(sizes) != 1:
            raise ValueError(f"a batch holds images of one size, got {sorted(sizes)}")
        sources = {e.condition_size for e in examples}
        if len(sources) != 1:
            shown = sorted(("none" if s is None else f"{s[1]}x{s[0]}") for s in sources)
            raise ValueError(f"a batch holds examples whose sources all have one size or are all none, got {shown}")
        editing = examples[0].condition_size is not None
        return cls(latents=mx.concatenate([e.latents for e in examples]),
                   prior_token_ids=mx.concatenate([e.prior_token_ids for e in examples]),
                   prompt_embeds=left_padded([e.prompt_embeds for e in examples]),
                   negative_prompt_embeds=left_padded([e.negative_prompt_embeds for e in examples]),
                   target_size=mx.array([[examples[0].height, examples[0].width]] * len(examples), dtype=mx.float32),
                   crop_coords=mx.zeros((len(examples), 2), dtype=mx.float32),
                   **(_stacked_sources(examples) if editing else {}))


def _stacked_sources(examples: list[DitExample]) -> dict:
    return dict(condition_latents=mx.concatenate([e.condition_latents for e in examples]),
                condition_size=examples[0].condition_size,
                prior_token_image_ids=mx.concatenate([e.prior_token_image_ids for e in examples]),
                source_image_grid_thw=examples[0].source_image_grid_thw)


def dit_example(*, vae, text_encoder, tokenizer, image, prompt: str, codes: np.ndarray, height: int, width: int,
                max_sequence_length: int = 2048, tiled: bool | None = None, source=None,
                source_codes: np.ndarray | None = None) -> DitExample:
    """The encodings of ``image`` (resized to ``height`` x ``width`` as the pipeline's image processor does) with
    ``prompt``; ``codes`` is its target grid (H/32, W/32) of VQ codes (train/ar.py's ``target_codes``).

    Editing: ``source`` (a PIL image or a path) is the fitted condition image, ``source_codes`` its VQ grid
    (h/32, w/32): ``target_codes(model, processor, source, h, w)`` at its own size."""
    if (source is None) != (source_codes is None):
        raise ValueError("an editing example needs both source and source_codes (the source's VQ grid)")
    pixels = VaeImageProcessor(vae.scale_factor).preprocess(image, height=height, width=width)
    embeds, negative = encode_prompt(text_encoder, tokenizer, [prompt], True, 1, max_sequence_length)
    prior = upsample_token_ids(codes, *np.shape(codes))
    example = DitExample(latents=encode_latents(vae, pixels, tiled),
                         prior_token_ids=mx.array(prior.astype(np.int32))[None],
                         prompt_embeds=embeds, negative_prompt_embeds=negative, height=height, width=width,
                         **(source_condition(vae, source, source_codes, tiled) if source is not None else {}))
    mx.eval(example.latents, example.prior_token_ids, example.condition_latents, example.prior_token_image_ids)
    return example


def source_condition(vae, source, codes: np.ndarray, tiled: bool | None = None) -> dict:
    """A fitted source image as an editing request gives it to write_condition_cache: its latents and (height,
    width) (stages' ``_encode_condition_images``: a fitted image's sides are whole DiT tokens, so it is encoded
    whole) and its VQ ``codes`` upsampled 2x with their grid (prior_grid's ``_add_source_images``)."""
    image = to_rgb(source) if isinstance(source, Image.Image) else load_image(source)
    w, h = image.size
    gh, gw = np.shape(codes)
    if (h, w) != (gh * CODE_PIXELS, gw * CODE_PIXELS):
        raise ValueError(f"the source's codes are a {gh}x{gw} grid, a {w}x{h} source needs {h // CODE_PIXELS}x"
                         f"{w // CODE_PIXELS} on sides that are multiples of {CODE_PIXELS}: fit the source as an "
                         "editing request does (CheckpointFacts.prepare_condition_images), then take its codes")
    pixels = VaeImageProcessor(vae.scale_factor).preprocess(image, height=h, width=w)
    ids = upsample_token_ids(codes, gh, gw).astype(np.int32)
    return dict(condition_latents=encode_latents(vae, pixels, tiled), condition_size=(h, w),
                prior_token_image_ids=mx.array(ids)[None],
                source_image_grid_thw=mx.array([[1, 2 * gh, 2 * gw]], dtype=mx.int32))


def training_sampler(scheduler, transformer, latents: mx.array):
    """The sampler inference makes for latents of this size (its shift follows the DiT's token count)."""
    rows, cols = transformer.config.token_grid(*latents.shape[-2:])
    return SAMPLERS["euler"](scheduler, image_seq_len=rows * cols)


@dataclass(frozen=True, kw_only=True)
class Draw:
    """The random part of one batch's loss: the noise, the DiT's timesteps and their sigmas, and the drop-out."""

    noise: mx.array
    timestep: mx.array  # (B,) what the DiT reads: the schedule's timestep minus one
    sigma: mx.array  # (B,)
    drop: bool  # trained unconditioned


def draw(sampler, batch: DitBatch, key: mx.array, drop_probability: float = 0.0) -> Draw:
    """The random part of a batch's loss from ``key`` alone: Gaussian noise, ``sampler.random_timesteps`` and, with
    ``drop_probability``, whether the batch is trained unconditioned."""
    k_noise, k_time, k_drop = mx.random.split(key, 3)
    noise = mx.random.normal(batch.latents.shape, dtype=mx.float32, key=k_noise)
    timestep, sigma = sampler.random_timesteps(batch.latents.shape[0], k_time)
    drop = drop_probability > 0 and mx.random.uniform(key=k_drop).item() < drop_probability
    return Draw(noise=noise, timestep=timestep, sigma=sigma, drop=drop)


def dit_inputs(batch: DitBatch, drop: bool) -> dict:
    """The DiT's conditions for a batch besides its latents and timestep: the conditional pass's, or with ``drop``
    the unconditional pass's (denoise.Stepper's passes)."""
    return dict(encoder_hidden_states=batch.negative_prompt_embeds if drop else batch.prompt_embeds,
                prior_token_id=batch.prior_token_ids,
                prior_token_drop=mx.full(batch.prior_token_ids.shape, drop, dtype=mx.bool_),
                target_size=batch.target_size, crop_coords=batch.crop_coords)


def condition_cache(transformer, batch: DitBatch):
    """The KV cache of an editing batch's sources, one sample per example, written by inference's
    ``write_condition_cache`` (lazily: computed with the pass that reads it, and differentiated through)."""
    n = batch.condition_latents.shape[0]
    conditions = [[(batch.condition_latents[i:i + 1], batch.condition_size)] for i in range(n)]
    ids = [batch.prior_token_image_ids[i] for i in range(n)]
    return write_condition_cache(transformer, conditions, ids, [batch.source_image_grid_thw] * n)


def flow_matching_loss(transformer, sampler, batch: DitBatch, d: Draw) -> mx.array:
    """The mean squared error, in float32, of the DiT's velocity at the latents noised by ``sampler`` (the one
    ``d`` was drawn from) against ``noise - x0``; an editing batch's conditional pass reads its sources' KV cache."""
    x0 = batch.latents.astype(mx.float32)
    x_t = sampler.add_noise(x0, d.noise, d.sigma)  # the DiT casts its inputs to its dtype
    reads = batch.condition_latents is not None and not d.drop  # the unconditional pass skips the cache
    caches = condition_cache(transformer, batch) if reads else None
    velocity = transformer(x_t, timestep=d.timestep, **dit_inputs(batch, d.drop), kv_caches=caches,
                           kv_cache_mode="read" if reads else None, return_dict=False)[0]
    return mx.mean(mx.square(velocity.astype(mx.float32) - (d.noise - x0)))
