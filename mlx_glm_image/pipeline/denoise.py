"""The denoising stage: initial latents, the condition images' KV cache, and the step loop with CFG.

The loop owns evaluation. Each DiT forward gets a step hook that schedules every block step (attention, then
feed-forward) with ``mx.async_eval`` and waits for the one ``STEPS_IN_FLIGHT - 1`` steps back: memory stays
bounded to a few steps' activations while the device never waits for the host to encode the next step
(README, "Speed and memory"). The condition pass that writes the KV cache gets no hook: it stays lazy and
is computed by the first step that reads it, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ..models.dit import GlmImageKVCache, GlmImageTransformer2DModel

STEPS_IN_FLIGHT = 2


def queued_steps(in_flight: int = STEPS_IN_FLIGHT) -> Callable[[mx.array], mx.array]:
    """A DiT step hook: schedule each step, wait for the one ``in_flight - 1`` steps back (1: synchronous)."""
    queue: list[mx.array] = []

    def hook(x: mx.array) -> mx.array:
        mx.async_eval(x)
        queue.append(x)
        if len(queue) >= in_flight:
            mx.eval(queue.pop(0))  # waits for that step; it is already scheduled
        return x

    return hook


def classifier_free_guidance(v_cond: mx.array, v_uncond: mx.array, guidance_scale: float) -> mx.array:
    """``v_uncond + g * (v_cond - v_uncond)`` (the pipeline's order of operations)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def prepare_latents(shape: tuple, latents=None, key: mx.array | None = None) -> mx.array:
    """Gaussian noise of ``shape`` (float32) from ``key``, or the given latents checked against it."""
    if latents is None:
        return mx.random.normal(shape, dtype=mx.float32, key=key)
    latents = mx.array(latents).astype(mx.float32)
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
    return latents


def write_condition_cache(transformer: GlmImageTransformer2DModel, conditions: list[list[tuple[mx.array, tuple]]],
                          prior_token_image_ids: list, source_image_grid_thw: list) -> GlmImageKVCache:
    """The KV cache of every sample's condition images: one DiT pass each (timestep 0, no text), lazily.

    ``conditions``: per sample, (normalized VAE latents (1, C, h, w), (height, width) in pixels) per image.
    """
    dtype = transformer.dtype
    text_dim = transformer.config.text_embed_dim
    kv_caches = GlmImageKVCache(transformer.config.num_layers)
    kv_caches.set_mode("write")
    for sample, images in enumerate(conditions):
        ids = mx.array(prior_token_image_ids[sample]).astype(mx.int32).reshape(-1)
        sizes = [int(np.prod(g)) for g in np.asarray(source_image_grid_thw[sample]).reshape(-1, 3)]
        starts = np.cumsum([0] + sizes)
        for i, (z, pixels_hw) in enumerate(images):
            transformer(z.astype(dtype), mx.zeros((1, 0, text_dim), dtype), ids[int(starts[i]) : int(starts[i + 1])],
                        mx.zeros((sizes[i],), dtype=mx.bool_), mx.zeros((1,)), mx.array([pixels_hw], dtype=mx.float32),
                        mx.zeros((1, 2)), kv_caches=kv_caches, return_dict=False)
        kv_caches.next_sample()
    return kv_caches


@dataclass
class DenoiseInputs:
    """What every step's two DiT passes read besides the latents (batch = images in the run)."""

    prompt_embeds: mx.array
    negative_prompt_embeds: mx.array | None  # None: no guidance
    prior_token_ids: mx.array  # (B, N) on the DiT's token grid
    target_size: mx.array  # (B, 2) pixels
    crop_coords: mx.array  # (B, 2)
    guidance_scale: float = 1.5


def velocity(transformer, x, t, inputs: DenoiseInputs, kv_caches: GlmImageKVCache | None, in_flight: int,
             split=None) -> mx.array:
    """The guided velocity of one step: conditional pass (reading the condition cache), then unconditional
    (prior embeddings dropped, the cache skipped). With ``split`` (parallel.Parallel, mode cfg), rank 0 runs the
    first and rank 1 the second, and they exchange their halves."""
    cond = dict(hidden_states=x, prior_token_id=inputs.prior_token_ids, timestep=t, target_size=inputs.target_size,
                crop_coords=inputs.crop_coords, kv_caches=kv_caches, return_dict=False)
    if split is not None:
        mine = (_conditional if split.leader else _unconditional)(transformer, inputs, kv_caches, in_flight, cond)
        return classifier_free_guidance(*split.guided(mine), inputs.guidance_scale)
    v = _conditional(transformer, inputs, kv_caches, in_flight, cond)
    if inputs.negative_prompt_embeds is None:
        return v
    return classifier_free_guidance(v, _unconditional(transformer, inputs, kv_caches, in_flight, cond), inputs.guidance_scale)


def _conditional(transformer, inputs: DenoiseInputs, kv_caches, in_flight: int, cond: dict) -> mx.array:
    if kv_caches is not None:
        kv_caches.set_mode("read")
    return transformer(encoder_hidden_states=inputs.prompt_embeds, prior_token_drop=mx.zeros(inputs.prior_token_ids.shape, mx.bool_),
                       step_hook=queued_steps(in_flight), **cond)[0].astype(mx.float32)


def _unconditional(transformer, inputs: DenoiseInputs, kv_caches, in_flight: int, cond: dict) -> mx.array:
    if kv_caches is not None:
        kv_caches.set_mode("skip")
    return transformer(encoder_hidden_states=inputs.negative_prompt_embeds,
                       prior_token_drop=mx.ones(inputs.prior_token_ids.shape, mx.bool_),
                       step_hook=queued_steps(in_flight), **cond)[0].astype(mx.float32)


def denoise(transformer, scheduler, latents: mx.array, inputs: DenoiseInputs, kv_caches: GlmImageKVCache | None = None,
            on_step_end: Callable[[int, float, mx.array], mx.array] | None = None, progress: bool = False,
            in_flight: int = STEPS_IN_FLIGHT, split=None) -> mx.array:
    """The Euler loop over ``scheduler``'s (already set) timesteps; evaluates the latents after every step.

    ``on_step_end(i, t, latents) -> latents`` runs after each step (the pipeline's callback protocol).
    """
    steps = range(len(scheduler.timesteps))
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="denoising", unit="step")
    batch = latents.shape[0]
    for i in steps:
        t = mx.full((batch,), scheduler.model_timestep(i), dtype=mx.float32)
        v = velocity(transformer, latents.astype(transformer.dtype), t, inputs, kv_caches, in_flight, split)
        latents = scheduler.step(v, i, latents)
        if split is not None:
            split.evaluate(latents)
        else:
            mx.eval(latents)
        if on_step_end is not None:
            latents = on_step_end(i, float(scheduler.timesteps[i]), latents)
    return latents
