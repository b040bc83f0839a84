"""The denoising stage: initial latents, the condition images' KV cache, and the ``Stepper``: the loop over the
steps of its sampler (flow.py), each velocity one DiT pass per ``Pass`` (conditional, unconditional) and
classifier-free guidance.

The loop owns evaluation. Each pass runs the DiT's pieces (``embed``, ``block`` by block, ``head``) with a step
hook that schedules every block step (attention, then feed-forward) with ``mx.async_eval`` and waits for the one
``STEPS_IN_FLIGHT - 1`` steps back: memory stays bounded to a few steps' activations while the device never waits
for the host to encode the next step (benchmarks/README.md). The condition pass that writes the KV cache gets no
hook: it stays lazy and is computed by the first step that reads it, once.

Which blocks a pass computes is the ``blocks`` policy's choice (``every_block``: all of them), given the pass and
the Stepper's step index (a sampler may ask for several velocities in one step; they share its index), so a step
cache is one policy, in one module (step_cache.py); a policy keeps what it needs from step to step itself, by
pass name. A policy that needs a value on the host to decide may be a generator that yields it (lazy): the
Stepper then queues the other passes' work before it comes back, so the device works while the host waits.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from ..models.dit import GlmImageKVCache, GlmImageTransformer2DModel
from .flow import FlowMatchEulerSampler
from .parallel import Single

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
    for sample, images in enumerate(conditions):
        ids = mx.array(prior_token_image_ids[sample]).astype(mx.int32).reshape(-1)
        sizes = [int(np.prod(g)) for g in np.asarray(source_image_grid_thw[sample]).reshape(-1, 3)]
        starts = np.cumsum([0] + sizes)
        for i, (z, pixels_hw) in enumerate(images):
            transformer(z.astype(dtype), mx.zeros((1, 0, text_dim), dtype), ids[int(starts[i]) : int(starts[i + 1])],
                        mx.zeros((sizes[i],), dtype=mx.bool_), mx.zeros((1,)), mx.array([pixels_hw], dtype=mx.float32),
                        mx.zeros((1, 2)), kv_caches=kv_caches, kv_cache_mode="write", return_dict=False)
        kv_caches.next_sample()
    return kv_caches


@dataclass
class DenoiseInputs:
    """What every step's DiT passes read besides the latents (batch = images in the request)."""

    prompt_embeds: mx.array
    negative_prompt_embeds: mx.array | None  # None: no guidance
    prior_token_ids: mx.array  # (B, N) on the DiT's token grid
    target_size: mx.array  # (B, 2) pixels
    crop_coords: mx.array  # (B, 2)
    guidance_scale: float = 1.5
    guidance_end: float = 1.0  # steps i with i < guidance_end * steps are guided; the rest run "cond" alone

    def guided(self, i: int, steps: int) -> bool:
        return self.negative_prompt_embeds is not None and i < self.guidance_end * steps


@dataclass
class Pass:
    """One DiT pass of every step: "cond" (the prompt's glyphs and prior tokens; reads the condition images' KV
    cache) or "uncond" (empty glyphs, prior embeddings dropped; skips the cache)."""

    name: str
    encoder_hidden_states: mx.array
    prior_token_drop: mx.array
    kv_cache_mode: str | None  # None without condition images


class Blocks:
    """What a blocks policy runs: ``blocks(start, stop, x)`` runs the DiT's blocks [start, stop) of one pass on the
    joint sequence x (``text_len`` glyph tokens, then the image's), and counts them."""

    def __init__(self, run: Callable[[int, mx.array], mx.array], n_blocks: int, text_len: int):
        self.run, self.n_blocks, self.text_len = run, n_blocks, text_len
        self.computed = 0

    def __call__(self, start: int, stop: int, x: mx.array) -> mx.array:
        for b in range(start, stop):
            x = self.run(b, x)
        self.computed += max(stop - start, 0)
        return x


def every_block(pass_: Pass, step: int, x: mx.array, blocks: Blocks) -> mx.array:
    """The blocks policy of the plain computation: every block at every step."""
    return blocks(0, blocks.n_blocks, x)


class Stepper:
    """The denoising loop of one request over the steps of its ``sampler`` (flow.py, made for this request).

    ``steps(latents)`` is a generator: it yields ``(i, latents)`` after each step, evaluated, so its consumer
    reports progress and stops the work at a step boundary by closing it. ``placement`` decides which passes
    run in this process (parallel.py); ``blocks(pass, step, x, blocks)`` which blocks each pass computes.
    ``computed`` / ``total`` count the blocks of the last step, ``passes`` its passes (run, of the planned: a step
    past ``guidance_end`` runs the conditional pass alone, everywhere), ``velocity`` is the step's guided velocity
    (``sampler.x0(latents, velocity, i + 1)`` is the clean image it points at).
    """

    def __init__(self, transformer: GlmImageTransformer2DModel, sampler: FlowMatchEulerSampler, inputs: DenoiseInputs,
                 kv_caches: GlmImageKVCache | None = None, placement=Single(), blocks=every_block,
                 in_flight: int = STEPS_IN_FLIGHT):
        self.transformer, self.sampler, self.inputs, self.kv_caches = transformer, sampler, inputs, kv_caches
        self.placement, self.blocks, self.in_flight = placement, blocks, in_flight
        self.computed = self.total = self.passes_run = 0
        self.velocity: mx.array | None = None
        shape = inputs.prior_token_ids.shape
        cached = kv_caches is not None
        self.passes = [Pass("cond", inputs.prompt_embeds, mx.zeros(shape, mx.bool_), "read" if cached else None)]
        if inputs.negative_prompt_embeds is not None:
            self.passes.append(Pass("uncond", inputs.negative_prompt_embeds, mx.ones(shape, mx.bool_),
                                    "skip" if cached else None))

    def steps(self, latents: mx.array, callback=None) -> Iterator[tuple[int, mx.array]]:
        """The sampler's steps from ``latents``. ``callback(i, t, {"latents", "prompt_embeds"}) -> dict`` runs after
        each step; the tensors it returns replace the loop's (diffusers' callback_on_step_end protocol)."""
        for i in range(self.sampler.num_inference_steps):
            self.computed = self.total = 0
            latents, self.velocity = self.sampler.denoise_step(lambda x, t: self.guided_velocity(i, x, t), i, latents)
            self.placement.evaluate(latents)
            if callback is not None:
                values = {"latents": latents, "prompt_embeds": self.passes[0].encoder_hidden_states}
                returned = callback(i, float(self.sampler.timesteps[i]), values) or {}
                self.passes[0].encoder_hidden_states = returned.get("prompt_embeds", values["prompt_embeds"])
                latents = returned.get("latents", latents)
            yield i, latents

    def guided_velocity(self, i: int, x: mx.array, timestep: float) -> mx.array:
        """The guided velocity at latents ``x`` and the DiT's ``timestep``, in step ``i``: each pass of this
        process, then every pass's (parallel.py), then ``v_uncond + g * (v_cond - v_uncond)``. The passes advance
        in turns: each runs until its policy asks for a value, which is queued, and is resumed after the others
        have queued their work."""
        x = x.astype(self.transformer.dtype)
        t = mx.full((x.shape[0],), timestep, dtype=mx.float32)
        guided = self.inputs.guided(i, self.sampler.num_inference_steps)
        # past the guided steps every process runs the conditional pass itself: nothing is exchanged
        mine = self.placement.my_passes(self.passes) if guided else self.passes[:1]
        self.passes_run = len(self.passes) if guided else 1
        running, done = [(p.name, self._pass(p, i, x, t)) for p in mine], {}
        while running:
            waiting = []
            for name, work in running:
                try:
                    mx.async_eval(next(work))
                    waiting.append((name, work))
                except StopIteration as finished:
                    done[name] = finished.value
            running = waiting
        if not guided:
            return done["cond"]
        v = self.placement.gather({p.name: done[p.name] for p in mine})
        if "uncond" not in v:
            return v["cond"]
        return classifier_free_guidance(v["cond"], v["uncond"], self.inputs.guidance_scale)

    def _pass(self, p: Pass, i: int, x: mx.array, t: mx.array):
        """One pass's velocity, as a generator of the values its blocks policy asks for."""
        dit, inputs, caches = self.transformer, self.inputs, self.kv_caches
        hook = queued_steps(self.in_flight)
        h, context = dit.embed(x, p.encoder_hidden_states, inputs.prior_token_ids, p.prior_token_drop, t,
                               inputs.target_size, inputs.crop_coords)
        blocks = Blocks(lambda b, h: dit.block(b, h, context, caches[b] if caches is not None else None,
                                               p.kv_cache_mode, hook),
                        len(dit.transformer_blocks), context.text_len)
        h = self.blocks(p, i, h, blocks)
        if inspect.isgenerator(h):
            h = yield from h
        self.computed += blocks.computed
        self.total += blocks.n_blocks
        return dit.head(h, context).astype(mx.float32)
