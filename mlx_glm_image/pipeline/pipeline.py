"""GlmImagePipeline: prompt (and optional condition images) -> images, with diffusers' names and call conventions.

The pipeline is three things: its components (components.py: diffusers' attributes, loaded on first use, kept or
freed by the memory policy), where the work goes (parallel.py: one process, or several under mlx.launch), and
the stages a call runs (stages.py: prior tokens, glyph embeddings, denoising, decoding). A call's arguments become
one checked ``Request`` (request.py) before any model runs; ``stream`` yields the run's events (events.py), and
``__call__`` and ``generate_batch`` consume them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from .. import loading, lora
from .components import COMPONENTS, DEFAULT_MEMORY, Components
from .events import Event
from .facts import sampling_settings
from .glyphs import encode_prompt
from .image_processor import VaeImageProcessor
from .parallel import join
from .prior_grid import generate_prior_tokens
from .record import image_record, run_record
from .report import ProgressBars, StageReport
from .request import Request, Sampling
from .stages import Run

DEFAULT_REPO = "zai-org/GLM-Image"


@dataclass
class GlmImagePipelineOutput:
    images: list  # PIL images, an (B, H, W, 3) array for "np", an NCHW MLX array for "mx", or latents
    prior_token_ids: mx.array | None = None
    timings: dict = field(default_factory=dict)  # seconds per stage
    peak_memory: dict = field(default_factory=dict)  # bytes per stage (MLX's allocator high-water mark)
    cache_summary: dict | None = None  # the step cache's cached steps and residual diffs (cache-dit's keys)


class GlmImagePipeline:
    """``GlmImagePipeline.from_pretrained(path_or_repo)(prompt)`` like diffusers, in MLX.

    Components are diffusers' attributes; each model is loaded on first use. ``memory``: "resident" keeps every
    loaded model (a second call loads nothing), "staged" frees each model after its stage (the peak is the
    largest stage, for 16 GB Macs), "auto" (the default) chooses resident when the weights fit (components.py).
    ``dtype`` is
    the compute dtype of the DiT, the AR model and the VAE; the glyph encoder keeps its checkpoint's.
    ``quantize`` (bits, or a ``quantize.QuantSpec``) quantizes the full-precision DiT and AR model once, at load
    time, by their own predicates; a converted folder is used as it is. ``parallel`` ("cfg", "data", "tensor" or
    "cfg,tensor", under mlx.launch) splits the work over processes (parallel.py).
    """

    def __init__(self, scheduler=None, transformer=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                 vision_language_encoder=None, *, source=None, dtype="bfloat16", quantize=None,
                 memory: str = DEFAULT_MEMORY,
                 vae_tiling: bool | None = None, verbose: bool = False, parallel: str | None = None,
                 parallel_timeout: float = 600.0):
        given = dict(scheduler=scheduler, transformer=transformer, vae=vae, text_encoder=text_encoder,
                     tokenizer=tokenizer, processor=processor, vision_language_encoder=vision_language_encoder)
        self.verbose = verbose
        self.placement = join(parallel, parallel_timeout)  # this process's share of the work (parallel.py)
        splits = self.placement.splits
        self.components = Components(given=given, source=source, dtype=dtype, quantize=quantize, memory=memory,
                                     log=self._log, splits=splits)
        if splits:  # a split the models cannot take is refused before anything is read
            self.placement.check_models(self.components)
        self.vae_tiling = vae_tiling  # None: by size (pipeline/decode.py)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike = DEFAULT_REPO, **kwargs) -> "GlmImagePipeline":
        """A pipeline folder (diffusers layout, or converted by convert.py) or a Hugging Face repo id (each
        component's files are fetched when it is first used), with the constructor's keywords (``dtype``,
        ``quantize``, ``memory``, ...) and their defaults. Nothing heavy is read here."""
        if loading.is_local(path_or_repo):
            root = Path(path_or_repo).expanduser()
            loading.check_pipeline_folder(root)
            path_or_repo = root
        return cls(source=path_or_repo, **kwargs)

    def _log(self, message: str):
        if self.verbose:
            print(message, flush=True)

    # what the pipeline holds and what it runs with
    source = property(lambda self: self.components.source, doc="the folder or Hub repo id components load from")
    dtype = property(lambda self: self.components.dtype)
    quantize = property(lambda self: self.components.quantize)
    memory = property(lambda self: self.components.memory, doc='"resident" or "staged", as resolved')
    loads = property(lambda self: self.components.loads, doc="models loaded from files so far")
    load_seconds = property(lambda self: self.components.load_seconds, doc="seconds spent loading them")
    vae_scale_factor = property(lambda self: self.components.vae_scale_factor)
    image_processor = property(lambda self: VaeImageProcessor(self.components.vae_scale_factor),
                               doc="diffusers' VaeImageProcessor for this VAE")

    # -- a call ---------------------------------------------------------------------------------------------

    def request(self, **arguments) -> Request:
        """One call's arguments checked and resolved (a ValueError says what is wrong), without running anything."""
        request = Request.from_call(self.components.facts, **arguments)
        self.placement.check(request)
        return request

    def stream(self, prompt=None, image=None, **arguments) -> Iterator[Event]:
        """``__call__``'s arguments; yields the run's events (events.py) as they happen: stage, condition, prefill,
        token, step, image. Closing it stops the work at the next of them and frees what staged memory loaded."""
        return self.stream_batch([dict(prompt=prompt, image=image, **arguments)])

    def stream_batch(self, requests: list) -> Iterator[Event]:
        """The events of ``generate_batch(requests)``, checked up front; image events carry their request's index."""
        return iter(self._run(requests))

    def __call__(self, prompt=None, image=None, *, return_dict: bool = True, progress: bool = False, **arguments):
        """diffusers' ``GlmImagePipeline.__call__``: the arguments are ``Request``'s (diffusers' names:
        ``height``, ``width``, ``num_inference_steps``, ``guidance_scale``, ``generator`` — an MLX key or an integer
        seed, ``seed=`` too — ``latents``, ``prompt_embeds``, ``prior_token_ids``, ``output_type``,
        ``callback_on_step_end(pipe, i, t, kwargs)`` with ``callback_on_step_end_tensor_inputs``, and the AR
        sampling settings ``temperature``, ``top_p``, ``top_k``). Returns ``GlmImagePipelineOutput`` or, with
        ``return_dict=False``, ``(images,)``."""
        (output,), _ = self.generate_batch([dict(prompt=prompt, image=image, **arguments)], progress=progress)
        return output if return_dict else (output.images,)

    def generate_batch(self, requests: list, progress: bool = False):
        """Many calls (each a dict of ``__call__``'s arguments, or a ``Request``), stage by stage: the AR model runs
        for every request, then the glyph encoder, then the DiT, then the VAE, so each model is loaded once even
        with staged memory. Each request gives the image ``__call__`` gives for it alone (same seed, same pixels).
        With ``parallel="data"`` this process runs every size-th request from its rank (None for the others).
        Returns (one GlmImagePipelineOutput per request, the run's StageReport)."""
        run = self._run(requests)
        report, bars = StageReport(self._log), ProgressBars(progress)
        try:
            for event in run:
                report.observe(event)
                bars.observe(event)
        finally:
            bars.close()
        outputs = [None] * len(run.requests)
        for job in run.jobs:
            outputs[job.index] = _output(job, report)
        return outputs, report

    def _run(self, requests: list) -> Run:
        """Every request checked (a dict of call arguments becomes a Request), before any model runs."""
        return Run(self, [r if isinstance(r, Request) else self.request(**r) for r in requests], self.record)

    def record(self, request: Request, index: int = 0, cache_summary: dict | None = None) -> dict:
        """The metadata that regenerates image ``index`` of ``request`` (record.py), with the step cache's
        ``cache_summary`` when it ran."""
        return image_record(request, run_record(self.components, self.placement), index, cache_summary)

    # -- LoRA adapters (diffusers' names; lora.py) -----------------------------------------------------------

    def load_lora_weights(self, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str | None = None,
                          scale: float = 1.0) -> str:
        """An adapter for the AR model or the DiT (PEFT's or diffusers' files: a folder, a file or a Hub repo id),
        active at ``scale`` (a finite number); the model it is for is the one whose layers it names. Without
        ``adapter_name`` it is named after its file or folder (``NAME_2`` when that name is taken). Returns its
        name."""
        lora.check_scale(scale, "scale")
        adapter = lora.read(str(pretrained_model_name_or_path), adapter_name, origin="adapter")
        return self.components.adapters.add(adapter, scale, rename=adapter_name is None).name

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        """The adapters that are active, and their weights (finite numbers; 1 each by default); the others stay
        loaded, off."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names and {len(weights)} weights")
        self.components.adapters.set_weights({n: 1.0 if w is None else w for n, w in zip(names, weights)})

    def get_active_adapters(self) -> list[str]:
        return list(self.components.adapters.weights)

    def unload_lora_weights(self):
        """Every adapter gone: the models' layers are their base layers again, bit for bit."""
        self.components.adapters.clear()

    def fuse_lora(self):
        """Fold the active adapters into the full-precision layers' weights (faster steps; quantized layers keep
        their separate low-rank path); ``unfuse_lora`` puts the base weights back."""
        self.components.adapters.fuse(True)

    def unfuse_lora(self):
        self.components.adapters.fuse(False)

    # -- diffusers' stage methods ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: list[str], do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1,
                      max_sequence_length: int = 2048):
        """Glyph embeddings of the prompts and of the empty negative prompt (diffusers' encode_prompt)."""
        return encode_prompt(self.text_encoder, self.tokenizer, prompt, do_classifier_free_guidance,
                             num_images_per_prompt, max_sequence_length)

    def generate_prior_tokens(self, prompt: list[str], height: int, width: int, image=None, generator=None,
                              temperature=None, top_p=None, top_k=None):
        """The AR stage: (prior_token_ids, prior_token_image_ids per sample, source grids per sample); the sampling
        settings not given are the model's generation_config.json's (facts.sampling_settings)."""
        model = self.vision_language_encoder
        sampling = Sampling(**sampling_settings(model.generation_config, temperature, top_p, top_k))
        return generate_prior_tokens(model, self.processor, prompt, height, width, images=image,
                                     sampler=sampling.sampler(), key=generator)


def _component(name: str, doc: str) -> property:
    return property(lambda self: self.components.get(name), lambda self, value: self.components.set(name, value), doc=doc)


for _c in COMPONENTS:  # diffusers' attributes: pipe.transformer, pipe.vae, ... (loaded on first use)
    setattr(GlmImagePipeline, _c.name, _component(_c.name, _c.doc))


def _output(job, report: StageReport) -> GlmImagePipelineOutput:
    images = job.images
    output_type = job.request.output_type
    if output_type == "np":
        import numpy as np

        images = np.stack(images) if images else images
    elif output_type in ("mx", "latent"):
        images = mx.stack(images) if images else images
    return GlmImagePipelineOutput(images, job.prior_token_ids, report.timings, report.peaks, job.cache_summary)
