"""A run: its requests through the four stages, each stage over every request before the next, as events.

prior (the AR model writes each request's token grid) -> glyphs (the T5 encoder) -> denoise (the DiT, with the
condition images' KV cache when editing) -> decode (the VAE). Each stage over the whole batch loads each model
once, also with staged memory, which frees a stage's models after it; the VAE that encodes condition images is
kept until it decodes them, so editing loads it once too.

``Run`` is iterated for its events (events.py). Closing the iteration (``close()`` on it, or a consumer that stops)
stops the work at the next condition image, prefill chunk, token or step and frees what staged memory loaded; a
failure frees it too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from . import decode as vae_codec
from .components import Components
from .denoise import DenoiseInputs, Stepper, every_block, prepare_latents, write_condition_cache
from .events import Event
from .glyphs import encode_prompt, repeat
from .image_processor import VaeImageProcessor, image_size
from .flow import SAMPLERS
from .preview import pooled, pooling, preview_steps
from .checks import NonFiniteError
from .prior_grid import prior_prompt_steps, prior_sequences, prior_token_ids
from .prior_tokens import Progress
from .request import Request
from .step_cache import blocks_policy


def check_finite(x: mx.array, stage: str, what: str):
    if not mx.all(mx.isfinite(x)).item():
        raise NonFiniteError(f"the {stage} stage produced non-finite {what} (NaN or inf): the weights may be corrupt")


@dataclass
class Job:
    """What the stages make for one request, each from the last's (the request itself never changes)."""

    request: Request
    index: int  # in the batch
    prior_token_ids: mx.array | None = None
    prior_token_image_ids: list | None = None
    source_image_grid_thw: list | None = None
    prompt_embeds: mx.array | None = None
    negative_prompt_embeds: mx.array | None = None
    latents: mx.array | None = None
    cache_summary: dict | None = None  # the step cache's decisions (step_cache.py), when it was on
    images: list = field(default_factory=list)  # one per image of the request, as output_type asks


class Run:
    """``requests`` through the stages of ``pipe`` (its components and placement); iterate for the events.
    ``record(request, index, cache_summary)`` is the metadata of image ``index`` of a request. ``jobs`` holds what
    each request that runs in this process (``placement.picks``) made."""

    def __init__(self, pipe, requests: list[Request], record: Callable[[Request, int, dict | None], dict]):
        self.pipe, self.record, self.requests = pipe, record, requests
        self.components: Components = pipe.components
        self.placement = pipe.placement
        picked = set(self.placement.picks(len(requests)))
        self.jobs = [Job(request, i) for i, request in enumerate(requests) if i in picked]

    def __iter__(self) -> Iterator[Event]:
        try:
            yield from self._stage("prior", self._prior)
            yield from self._stage("glyphs", self._glyphs)
            yield from self._stage("denoise", self._denoise)
            yield from self._stage("decode", self._decode)
        finally:  # done, failed or closed: staged memory keeps nothing
            self.components.release()

    def _stage(self, name: str, work) -> Iterator[Event]:
        mx.synchronize()
        mx.reset_peak_memory()
        t0, load0 = time.perf_counter(), self.components.load_seconds
        yield Event(kind="stage", stage=name)
        for job in self.jobs:
            yield from work(job)
        mx.synchronize()
        load = self.components.load_seconds - load0
        yield Event(kind="stage", stage=name, done=True, seconds=time.perf_counter() - t0 - load, load_seconds=load,
                    peak_memory=mx.get_peak_memory())
        self.components.release(name)

    # -- the stages, for one request ------------------------------------------------------------------------

    def _prior(self, job: Job) -> Iterator[Event]:
        r = job.request
        if r.prior_token_ids is not None:
            job.prior_token_ids = _as_ids(r.prior_token_ids)
            job.prior_token_image_ids, job.source_image_grid_thw = r.prior_token_image_ids, r.source_image_grid_thw
        elif not self.placement.runs_prior:  # the leader's tokens arrive by placement.share
            rows, cols = self._token_grid(r)
            job.prior_token_ids = mx.zeros((r.batch, rows * cols), mx.int32)
        else:
            model, processor = self.components.get("vision_language_encoder"), self.components.get("processor")
            reading = prior_prompt_steps(model, processor, list(r.prompt), r.height, r.width, r.image)
            prompt = yield from _prior_events(reading, job.index, 0, r.batch)
            steps = prior_sequences(model, prompt, r.sampling.sampler(), r.generator)
            sequences = yield from _prior_events(steps, job.index, prompt.max_new_tokens, r.batch)
            job.prior_token_ids = prior_token_ids(sequences, prompt)
            job.prior_token_image_ids, job.source_image_grid_thw = prompt.prior_token_image_ids, prompt.source_image_grid_thw
        job.prior_token_ids = self.placement.share(job.prior_token_ids)
        mx.eval(job.prior_token_ids)

    def _glyphs(self, job: Job) -> Iterator[Event]:
        r = job.request
        guided, per_prompt = r.schedule.guided, r.num_images_per_prompt
        if r.prompt_embeds is None:
            job.prompt_embeds, job.negative_prompt_embeds = encode_prompt(
                self.components.get("text_encoder"), self.components.get("tokenizer"), list(r.prompt), guided,
                per_prompt, r.max_sequence_length)
        else:
            job.prompt_embeds = repeat(mx.array(r.prompt_embeds), per_prompt)
            job.negative_prompt_embeds = repeat(mx.array(r.negative_prompt_embeds), per_prompt) if guided else None
        yield from ()

    def _denoise(self, job: Job) -> Iterator[Event]:
        r = job.request
        transformer = self.components.get("transformer")
        f, (rows, cols) = self.components.vae_scale_factor, self._token_grid(r)
        inputs = self._denoise_inputs(job, transformer.dtype)
        self.placement.align(inputs, rows * cols)
        latents = prepare_latents((r.num_images, self.components.latent_channels, r.height // f, r.width // f),
                                  r.latents, r.generator)
        kv_caches = None
        if r.image is not None and self.placement.reads_conditions:  # the conditional pass reads the condition images
            conditions = yield from self._encode_condition_images(job.index, r.image)
            kv_caches = write_condition_cache(transformer, conditions, job.prior_token_image_ids,
                                              job.source_image_grid_thw)
        schedule = r.schedule
        sampler = SAMPLERS[schedule.sampler](
            self.components.get("scheduler"), image_seq_len=rows * cols,
            num_inference_steps=schedule.num_inference_steps, timesteps=schedule.timesteps, sigmas=schedule.sigmas)
        cache = blocks_policy(r.cache_config, r.calibrator_config)
        stepper = Stepper(transformer, sampler, inputs, kv_caches, self.placement, blocks=cache or every_block)
        total = sampler.num_inference_steps
        previews = preview_steps(total, r.previews) if self.placement.decodes else []
        try:
            for i, latents in stepper.steps(latents, self._callback(r)):
                yield Event(kind="step", request=job.index, index=i, total=total, count=r.num_images,
                            blocks=(stepper.computed, stepper.total), passes=(stepper.passes_run, len(stepper.passes)))
                if i in previews:
                    x0 = sampler.x0(latents, stepper.velocity, i + 1)
                    for k, image in enumerate(self._preview(x0)):
                        yield Event(kind="preview", request=job.index, index=previews.index(i), total=len(previews),
                                    step=i, image_index=k, image=image)
        finally:
            if kv_caches is not None:
                kv_caches.clear()
        check_finite(latents, "denoise", "latents")
        job.latents = latents
        job.cache_summary = cache.summary() if cache is not None else None

    def _decode(self, job: Job) -> Iterator[Event]:
        r = job.request
        if not self.placement.decodes:
            return
        if r.output_type == "latent":
            images = list(job.latents)
        else:
            vae = self.components.get("vae")
            pixels = decode_latents(vae, job.latents, self.pipe.vae_tiling)
            images = list(VaeImageProcessor(self.components.vae_scale_factor).postprocess(pixels, r.output_type))
        job.images = images
        for k, image in enumerate(images):
            yield Event(kind="image", request=job.index, index=k, total=len(images), image=image, seed=r.seed,
                        metadata=self.record(r, k, job.cache_summary))

    # -- their pieces ---------------------------------------------------------------------------------------

    def _token_grid(self, r: Request) -> tuple[int, int]:
        """The DiT's token grid (rows, columns) of the request's image: its latents' (models/dit.py)."""
        f = self.components.vae_scale_factor
        return self.components.config("transformer").token_grid(r.height // f, r.width // f)

    def _preview(self, x0: mx.array) -> list:
        """Predicted clean latents, pooled and decoded small (the VAE stays loaded until the decode stage)."""
        vae = self.components.get("vae")
        f = self.components.vae_scale_factor
        _, _, h, w = x0.shape
        small = pooled(x0, pooling(h * f, w * f, h, w))
        return VaeImageProcessor(f).postprocess(decode_latents(vae, small, tiled=False), "pil")

    def _denoise_inputs(self, job: Job, dtype) -> DenoiseInputs:
        """What each step's DiT passes read, one row per image of the request, in the DiT's dtype."""
        r = job.request
        n = r.num_images
        negative = job.negative_prompt_embeds
        return DenoiseInputs(
            prompt_embeds=job.prompt_embeds.astype(dtype),
            negative_prompt_embeds=negative.astype(dtype) if negative is not None else None,
            prior_token_ids=repeat(job.prior_token_ids, r.num_images_per_prompt),
            target_size=mx.array([[r.height, r.width]] * n, dtype=mx.float32),
            crop_coords=mx.array([list(r.crops_coords_top_left)] * n, dtype=mx.float32),
            guidance_scale=r.schedule.guidance_scale, guidance_end=r.schedule.guidance_end)

    def _encode_condition_images(self, request: int, images) -> Iterator[Event]:
        """Per sample, each condition image as normalized VAE latents and its (height, width) in pixels (the
        return value); a "condition" event after each."""
        vae = self.components.get("vae")
        m = self.components.vae_scale_factor * self.components.patch_size
        processor = VaeImageProcessor(self.components.vae_scale_factor)
        total, done = sum(len(sample_images) for sample_images in images), 0
        out = []
        for sample_images in images:
            encoded = []
            for img in sample_images:
                w0, h0 = image_size(img)
                pixels = processor.preprocess(img, height=(h0 // m) * m, width=(w0 // m) * m)
                latents = encode_latents(vae, pixels, self.pipe.vae_tiling)
                mx.eval(latents)  # done before its event: a consumer that stops there stops after this image
                encoded.append((latents, tuple(pixels.shape[-2:])))
                yield Event(kind="condition", request=request, stage="denoise", index=done, total=total)
                done += 1
            out.append(encoded)
        return out

    def _callback(self, r: Request):
        """diffusers' ``callback_on_step_end(pipe, i, t, {name: tensor})`` as the Stepper calls it."""
        if r.callback_on_step_end is None:
            return None
        names = r.callback_on_step_end_tensor_inputs
        return lambda i, t, values: r.callback_on_step_end(self.pipe, i, t, {k: values[k] for k in names})


def decode_latents(vae, latents: mx.array, tiled: bool | None = None) -> mx.array:
    """Denormalize and decode (B, C, h, w) latents to (B, 3, H, W) pixels in about [-1, 1], checked finite."""
    pixels = vae_codec.decode(vae, vae.denormalize_latents(latents.astype(vae.dtype)), tiled=tiled)
    check_finite(pixels, "decode", "pixels")
    return pixels


def encode_latents(vae, pixels: mx.array, tiled: bool | None = None) -> mx.array:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H/8, W/8) normalized latents (the posterior mean), as the DiT reads
    them: a condition image's, and a training image's (train/dit.py)."""
    return vae.normalize_latents(vae_codec.encode(vae, pixels.astype(vae.dtype), tiled=tiled))


def _prior_events(steps, request: int, total: int, count: int):
    """The prior stage's generators as events: each ``Progress`` (a condition image, a prefill chunk) as its kind,
    each token as a "token" of ``total``; returns the generator's value. Closing it closes the generator."""
    i = 0
    try:
        while True:
            try:
                item = next(steps)
            except StopIteration as done:
                return done.value
            if isinstance(item, Progress):
                yield Event(kind=item.kind, request=request, stage="prior", index=item.index, total=item.total)
            else:
                yield Event(kind="token", request=request, index=i, total=total, count=count)
                i += 1
    finally:
        steps.close()


def _as_ids(ids) -> mx.array:
    ids = mx.array(np.asarray(ids) if not isinstance(ids, mx.array) else ids).astype(mx.int32)
    return ids[None] if ids.ndim == 1 else ids
