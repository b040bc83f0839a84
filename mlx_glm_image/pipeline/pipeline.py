"""GlmImagePipeline: prompt (and optional condition images) -> images, with diffusers' names and call conventions.

The pipeline holds its components (diffusers' attribute names), loads each on first use, and keeps it or frees
it after its stage by its memory policy. A call reads as its stages: prior tokens (the AR model), glyph
embeddings (the T5 encoder), denoising (the DiT, with the condition images' KV cache when editing), decoding
(the VAE). Each stage's work lives in its own module of this package; only ``loading`` reads files.
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .. import loading
from ..models import AutoencoderKL, GlmImageForConditionalGeneration, GlmImageTransformer2DModel, T5EncoderModel
from ..quantize import as_spec
from ..scheduler import FlowMatchEulerDiscreteScheduler
from . import decode as vae_codec
from .parallel import Parallel
from .checks import check_prompt, check_sampling, check_seed, check_size
from .denoise import DenoiseInputs, denoise, prepare_latents, write_condition_cache
from .glyphs import ByT5Tokenizer, get_glyph_embeds
from .image_processor import VaeImageProcessor, fit_condition_image, to_rgb
from .prior_tokens import as_key, generate_prior_tokens, normalize_images, sampling_settings
from .processor import GlmImageProcessor

DEFAULT_REPO = "zai-org/GLM-Image"
MODELS = {
    "vision_language_encoder": GlmImageForConditionalGeneration,
    "text_encoder": T5EncoderModel,
    "transformer": GlmImageTransformer2DModel,
    "vae": AutoencoderKL,
}
MEMORY_MODES = ("auto", "resident", "staged")
# "auto" keeps every component resident when their weights take at most this share of the memory budget; the
# rest is left for activations (the DiT's at 2048x2048, the VAE's decode) and for the system.
RESIDENT_SHARE = 0.6


@dataclass
class GlmImagePipelineOutput:
    images: list  # PIL images, an (B, H, W, 3) array for "np", an NCHW MLX array for "mx", or latents
    prior_token_ids: mx.array | None = None
    timings: dict = field(default_factory=dict)  # seconds per stage
    peak_memory: dict = field(default_factory=dict)  # bytes per stage (MLX's allocator high-water mark)


def memory_budget() -> int:
    """Bytes the models may use: Metal's recommended working set, else the memory available now."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _component(name: str, doc: str) -> property:
    def get(self):
        return self._get(name)

    def set(self, value):
        self._components[name] = value

    return property(get, set, doc=doc)


class GlmImagePipeline:
    """``GlmImagePipeline.from_pretrained(path_or_repo)(prompt)`` like diffusers, in MLX.

    Components are diffusers' attributes; each model is loaded on first use. ``memory``: "resident" keeps every
    loaded model (a second call loads nothing), "staged" frees each model after its stage (the peak is the
    largest stage, for 16 GB Macs), "auto" chooses resident when the weights take at most
    ``RESIDENT_SHARE`` of the memory budget (Metal's recommended working set, else the available memory).
    ``dtype`` is the compute dtype of the DiT, the AR model and the VAE; the glyph encoder keeps its
    checkpoint's. ``quantize`` (bits, or a ``quantize.QuantSpec``) quantizes the full-precision DiT and AR
    model once, at load time, by their own predicates; a converted folder is used as it is.
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    transformer = _component("transformer", "the DiT (GlmImageTransformer2DModel)")
    vae = _component("vae", "the VAE (AutoencoderKL)")
    text_encoder = _component("text_encoder", "the ByT5 glyph encoder (T5EncoderModel)")
    vision_language_encoder = _component("vision_language_encoder", "the AR prior model")
    tokenizer = _component("tokenizer", "the glyph encoder's ByT5 tokenizer")
    processor = _component("processor", "the AR model's tokenizer, chat template and image processor")
    scheduler = _component("scheduler", "the flow-matching Euler scheduler")

    def __init__(self, scheduler=None, transformer=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                 vision_language_encoder=None, *, source=None, dtype="bfloat16", quantize=None, memory: str = "resident",
                 vae_tiling: bool | None = None, verbose: bool = False, parallel: str | None = None):
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        given = dict(scheduler=scheduler, transformer=transformer, vae=vae, text_encoder=text_encoder,
                     tokenizer=tokenizer, processor=processor, vision_language_encoder=vision_language_encoder)
        self._components = {k: v for k, v in given.items() if v is not None}
        self._loaded: set[str] = set()  # the models this pipeline loaded itself (staged memory frees only those)
        self._configs: dict = {}  # config dataclasses read from the source's json files
        self.source = source  # where components not given are loaded from: a folder or a Hub repo id
        self.dtype = loading.to_dtype(dtype)
        self.quantize = as_spec(quantize) if quantize else None  # checked now, applied as each model loads
        self.vae_tiling = vae_tiling  # None: by size (pipeline/decode.py)
        self.verbose = verbose
        self.loads = 0  # models loaded from files so far
        self.load_seconds = 0.0  # time spent loading them
        self.memory = self._resolve_memory(memory)
        self.parallel = Parallel.join(parallel)  # None, or this process's place among mlx.launch's (parallel.py)
        vae_config = vae.config if vae is not None else self._model_config("vae")
        dit_config = transformer.config if transformer is not None else self._model_config("transformer")
        self.vae_scale_factor = vae_config.scale_factor
        self.patch_size = dit_config.patch_size
        self.latent_channels = dit_config.in_channels
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike = DEFAULT_REPO, dtype="bfloat16", quantize=None,
                        memory: str = "auto", **kwargs) -> "GlmImagePipeline":
        """A pipeline folder (diffusers layout, or converted by convert.py) or a Hugging Face repo id (each
        component's files are fetched when it is first used). Nothing heavy is read here."""
        if loading.is_local(path_or_repo):
            root = Path(path_or_repo).expanduser()
            if not root.is_dir():
                raise loading.WeightsError(f"{root} does not exist" if not root.exists() else f"{root} is not a folder")
            if not (root / "transformer").is_dir():
                raise loading.WeightsError(f"{root} is not a GLM-Image pipeline folder (no transformer/ inside)")
            path_or_repo = root
        return cls(source=path_or_repo, dtype=dtype, quantize=quantize, memory=memory, **kwargs)

    # -- components -----------------------------------------------------------------------------------------

    def _folder(self, name: str, files: str = "*") -> Path:
        if self.source is None:
            raise loading.WeightsError(f"this pipeline has no {name} and no source to load it from")
        return loading.component_folder(self.source, name, files=files)

    def _model_config(self, name: str):
        """A model's config dataclass: the loaded model's, else its folder's config.json (nothing else read)."""
        if name in self._components:
            return self._components[name].config
        if name not in self._configs:
            folder = self._folder(name, files="*.json")
            self._configs[name] = loading.model_config(MODELS[name], loading.read_config(folder), folder)
        return self._configs[name]

    def missing_components(self, names) -> list[str]:
        """Which of ``names`` a local pipeline folder lacks (a Hub source is asked when a component is used)."""
        if self.source is not None and not loading.is_local(self.source):
            return []
        return [n for n in names if n not in self._components and (self.source is None or not (Path(self.source) / n).is_dir())]

    def _get(self, name: str):
        if name not in self._components:
            self._components[name] = self._load(name)
        return self._components[name]

    def _load(self, name: str):
        if name == "scheduler":
            return FlowMatchEulerDiscreteScheduler.from_pretrained(self._folder(name))
        if name == "processor":
            return GlmImageProcessor.from_pretrained(self._folder(name))
        if name == "tokenizer":
            try:
                return ByT5Tokenizer.from_pretrained(self._folder(name))
            except loading.WeightsError:  # ByT5 needs no vocabulary file: its defaults are the tokenizer
                return ByT5Tokenizer()
        t0 = time.perf_counter()
        cls = MODELS[name]
        quantize = self.quantize if cls.quantize_by_default else None
        dtype = None if name == "text_encoder" else self.dtype  # ByT5 keeps its checkpoint's float32
        model = cls.from_pretrained(self.source, dtype=dtype, quantize=quantize)
        mx.eval(model.parameters())  # read now, so that loading is timed apart from compute
        self.loads += 1
        self.load_seconds += time.perf_counter() - t0
        self._loaded.add(name)
        self._log(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
        return model

    def _resolve_memory(self, memory: str) -> str:
        if memory != "auto":
            return memory
        if self.source is None:
            return "resident"
        try:
            weights = sum(self._weight_bytes(name) for name in MODELS if name not in self._components)
        except loading.WeightsError:  # a component is missing: it will say so when it is needed
            return "staged"
        return "resident" if weights <= RESIDENT_SHARE * memory_budget() else "staged"

    def _weight_bytes(self, name: str) -> int:
        """A model's bytes once loaded, from its files (only the json files are fetched from the Hub)."""
        folder = self._folder(name, files="*.json")
        size = loading.weight_bytes(folder)
        bits = self.quantize.bits if self.quantize else None
        if bits and MODELS[name].quantize_by_default and not loading.read_config(folder).get("quantization"):
            size = size * bits // 16  # the released weights are bf16
        return size

    def _release(self, *names: str):
        """After a stage, in staged memory: drop that stage's models (those this pipeline loaded)."""
        if self.memory != "staged":
            return
        for name in set(names) & self._loaded:
            self._components.pop(name, None)
            self._loaded.discard(name)
        gc.collect()
        mx.clear_cache()

    def _log(self, message: str):
        if self.verbose:
            print(message, flush=True)

    def sampling_settings(self, temperature=None, top_p=None, top_k=None) -> dict:
        """The AR sampling settings a call with these arguments uses (read from the checkpoint's files only)."""
        if "vision_language_encoder" in self._components:
            config = self._components["vision_language_encoder"].generation_config
        else:
            folder = self._folder("vision_language_encoder", files="*.json")
            config = loading.read_config(folder, "generation_config.json") if (folder / "generation_config.json").is_file() else {}
        return sampling_settings(config, temperature, top_p, top_k)

    def revision(self) -> str | None:
        """The Hub commit the components come from (its snapshot folder's name); None for a local folder."""
        if self.source is None or loading.is_local(self.source):
            return None
        return self._folder("transformer", files="*.json").parent.name

    def quantization(self) -> dict:
        """Per model: the quantization it runs with (a converted folder's, or load-time ``quantize``), or None."""
        out = {}
        for name, cls in MODELS.items():
            if self.missing_components([name]):
                continue
            stored = loading.read_config(self._folder(name, files="*.json")).get("quantization")
            if stored is None and self.quantize and cls.quantize_by_default:
                stored = self.quantize.as_config()
            out[name] = {k: stored[k] for k in ("bits", "group_size", "mode") if k in stored} if stored else None
        return out

    # -- checks ---------------------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Heights and widths are multiples of this: the AR model's token grid is half the DiT's."""
        return self.vae_scale_factor * self.patch_size * 2

    def check_inputs(self, prompt, prompt_embeds, prior_token_ids, prior_token_image_ids, source_image_grid_thw, image,
                     output_type, num_images_per_prompt, tensor_inputs):
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass `prompt` or `prompt_embeds`, not both.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")
        if prompt is None and prior_token_ids is None:
            raise ValueError("Provide either `prompt` or `prior_token_ids`.")
        if (prior_token_image_ids is None) != (source_image_grid_thw is None):
            raise ValueError("`prior_token_image_ids` and `source_image_grid_thw` must be provided together for image editing.")
        if prior_token_image_ids is not None and (prior_token_ids is None or image is None):
            raise ValueError("`prior_token_image_ids` needs `prior_token_ids` and the condition `image` too.")
        if output_type not in ("pil", "np", "latent", "mx"):
            raise ValueError(f"output_type must be 'pil', 'np', 'mx' or 'latent', got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be at least 1")
        check_prompt(prompt)
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found {unknown}")

    @property
    def max_side(self) -> int | None:
        """The largest image side the AR model takes (its vision config's image_size), when there is one."""
        if "vision_language_encoder" not in self._components and self.missing_components(["vision_language_encoder"]):
            return None
        try:
            return self._model_config("vision_language_encoder").vision_config.image_size
        except loading.WeightsError:
            return None

    def image_size(self, images, height: int | None, width: int | None) -> tuple[int, int]:
        """The size to generate, checked: as asked, else the first condition image's rounded down to the size
        multiple, else 1024x1024."""
        m = self.size_multiple
        if images is not None:
            w0, h0 = _image_size(images[0][0])
            height = (h0 // m) * m if height is None else height
            width = (w0 // m) * m if width is None else width
        height, width = 1024 if height is None else height, 1024 if width is None else width
        check_size(height, width, m, self.max_side)
        return height, width

    # -- the call -------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.5,
        num_images_per_prompt: int = 1,
        generator=None,
        latents: mx.array | None = None,
        prompt_embeds: mx.array | None = None,
        negative_prompt_embeds: mx.array | None = None,
        prior_token_ids: mx.array | None = None,
        prior_token_image_ids: list | None = None,
        source_image_grid_thw: list | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 2048,
        seed: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        progress: bool = False,
    ):
        """diffusers' ``GlmImagePipeline.__call__``; ``generator`` is an MLX key or an integer seed (``seed=``
        too) and drives both the AR sampling and the noise. ``callback_on_step_end(pipe, i, t, kwargs)`` gets
        the tensors named by ``callback_on_step_end_tensor_inputs`` after each step and may return replacements.
        Returns ``GlmImagePipelineOutput`` or, with ``return_dict=False``, ``(images,)``."""
        job = self._job(**{k: v for k, v in locals().items() if k not in ("self", "return_dict", "progress")})
        report = self._run_stages([job], progress)
        if not return_dict:
            return (job.result,)
        return GlmImagePipelineOutput(job.result, job.prior_token_ids, report.timings, report.peaks)

    def generate_batch(self, requests: list[dict], progress: bool = False):
        """Many calls (each a dict of ``__call__``'s arguments), stage by stage: the AR model runs for every
        request, then the glyph encoder, then the DiT, then the VAE, so each model is loaded once even with
        staged memory. Each request gives the image ``__call__`` gives for it alone (same seed, same pixels).
        With ``parallel="data"`` this process runs every size-th request from its rank (None for the others).
        Returns (one GlmImagePipelineOutput per request, the run's StageReport)."""
        jobs = [self._job(**{k: v for k, v in r.items() if k not in ("return_dict", "progress")}) for r in requests]
        picked = range(self.parallel.rank, len(jobs), self.parallel.size) if self._mode("data") else range(len(jobs))
        report = self._run_stages([jobs[i] for i in picked], progress)
        return [GlmImagePipelineOutput(j.result, j.prior_token_ids, report.timings, report.peaks) if i in picked else None
                for i, j in enumerate(jobs)], report

    def _mode(self, mode: str) -> bool:
        return self.parallel is not None and self.parallel.mode == mode

    def check_call(self, **kwargs) -> None:
        """Check a call's arguments as ``__call__`` would, without running anything (a ValueError says what)."""
        self._job(**kwargs)

    def _job(self, prompt=None, image=None, height=None, width=None, num_inference_steps=50, timesteps=None, sigmas=None,
             guidance_scale=1.5, num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None,
             negative_prompt_embeds=None, prior_token_ids=None, prior_token_image_ids=None, source_image_grid_thw=None,
             crops_coords_top_left=(0, 0), output_type="pil", callback_on_step_end=None,
             callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=2048, seed=None, temperature=None,
             top_p=None, top_k=None) -> "_Job":
        """Check one call's arguments (before any model runs) and normalize them."""
        self.check_inputs(prompt, prompt_embeds, prior_token_ids, prior_token_image_ids, source_image_grid_thw, image,
                          output_type, num_images_per_prompt, callback_on_step_end_tensor_inputs)
        check_sampling(num_inference_steps if timesteps is None and sigmas is None else None, guidance_scale,
                       temperature, top_p, top_k)
        check_seed(generator if generator is not None and not isinstance(generator, mx.array) else seed)
        if self._mode("cfg") and guidance_scale <= 1:
            raise ValueError(f"--parallel cfg splits guidance: it needs guidance > 1, got {guidance_scale}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        images = normalize_images(image, len(prompts) if prompts is not None else prompt_embeds.shape[0])
        if images is not None and prior_token_ids is None:
            images = self.prepare_condition_images(images)
        height, width = self.image_size(images, height, width)
        return _Job(prompts, images, height, width, as_key(generator if generator is not None else seed), guidance_scale,
                    num_images_per_prompt, crops_coords_top_left, num_inference_steps, timesteps, sigmas, temperature,
                    top_p, top_k, max_sequence_length, output_type, callback_on_step_end,
                    callback_on_step_end_tensor_inputs, latents, prompt_embeds, negative_prompt_embeds,
                    prior_token_ids, prior_token_image_ids, source_image_grid_thw)

    def _run_stages(self, jobs: list["_Job"], progress: bool) -> "StageReport":
        """Each stage over every job, then its models are freed (staged memory)."""
        report = StageReport(self._log)
        with report("prior", self):
            for job in jobs:
                self._prior_stage(job, progress, report)
        self._release("vision_language_encoder")
        with report("glyph encoder", self):
            for job in jobs:
                self._glyph_stage(job)
        self._release("text_encoder")
        leader = not self._mode("cfg") or self.parallel.leader  # cfg: only rank 0 needs the VAE
        with report("denoising", self):
            conditions = [self.encode_condition_images(j.images) if j.images is not None and leader else None for j in jobs]
            self._release("vae")
            for job, condition in zip(jobs, conditions):
                self._denoise_stage(job, condition, progress, report)
        self._release("transformer")
        decoded = [j for j in jobs if j.output_type != "latent" and leader]
        for job in jobs:
            job.result = job.latents
        if decoded:
            with report("vae decode", self):
                for job in decoded:
                    job.result = self.image_processor.postprocess(self.decode_latents(job.latents), job.output_type)
            self._release("vae")
        return report

    def _prior_stage(self, job: "_Job", progress: bool, report: "StageReport"):
        split = self.parallel if self._mode("cfg") else None
        if job.prior_token_ids is None and split is not None and not split.leader:  # rank 0's, broadcast below
            m = self.vae_scale_factor * self.patch_size
            job.prior_token_ids = mx.zeros((len(job.prompts), (job.height // m) * (job.width // m)), mx.int32)
        elif job.prior_token_ids is None:
            job.prior_token_ids, job.prior_token_image_ids, job.source_image_grid_thw = self.generate_prior_tokens(
                job.prompts, job.height, job.width, job.images, job.key, job.temperature, job.top_p, job.top_k, progress)
            report.tokens += len(job.prompts) * _ar_tokens(job.height, job.width, job.images is not None)
        job.prior_token_ids = _as_ids(job.prior_token_ids)
        if split is not None:
            job.prior_token_ids = split.broadcast(job.prior_token_ids)
        mx.eval(job.prior_token_ids)

    def _glyph_stage(self, job: "_Job"):
        job.prompt_embeds, job.negative_prompt_embeds = self._prompt_embeds(
            job.prompts, job.prompt_embeds, job.negative_prompt_embeds, job.guidance_scale, job.per_prompt,
            job.max_sequence_length)

    def _denoise_stage(self, job: "_Job", conditions, progress: bool, report: "StageReport"):
        inputs = self.denoise_inputs(job.prompt_embeds, job.negative_prompt_embeds, job.prior_token_ids, job.per_prompt,
                                     job.height, job.width, job.crop, job.guidance_scale)
        f = self.vae_scale_factor
        latents = prepare_latents((len(inputs.target_size), self.latent_channels, job.height // f, job.width // f),
                                  job.latents, job.key)
        kv_caches = None
        if conditions is not None:
            kv_caches = write_condition_cache(self.transformer, conditions, job.prior_token_image_ids,
                                              job.source_image_grid_thw)
        tokens = (job.height // f) * (job.width // f) // self.patch_size**2
        self.scheduler.set_timesteps(job.steps, image_seq_len=tokens, timesteps=job.timesteps, sigmas=job.sigmas)
        job.latents = self.denoise(latents, inputs, kv_caches, job.callback, job.tensor_inputs, progress)
        report.steps += len(self.scheduler.timesteps)
        _check_finite(job.latents, "denoising", "latents")

    # -- stages ---------------------------------------------------------------------------------------------

    def generate_prior_tokens(self, prompt: list[str], height: int, width: int, image=None, generator=None,
                              temperature=None, top_p=None, top_k=None, progress: bool = False):
        """The AR stage: (prior_token_ids, prior_token_image_ids per sample, source grids per sample)."""
        callback = bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompt) * _ar_tokens(height, width, image is not None), desc="prior tokens", unit="tok")
            callback = lambda *a, **k: bar.update(1)  # noqa: E731
        try:
            return generate_prior_tokens(self.vision_language_encoder, self.processor, prompt, height, width,
                                         images=image, key=generator, temperature=temperature, top_p=top_p, top_k=top_k,
                                         callback=callback)
        finally:
            if bar is not None:
                bar.close()

    def encode_prompt(self, prompt: list[str], do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1,
                      max_sequence_length: int = 2048):
        """Glyph embeddings of the prompts and of the empty negative prompt (diffusers' encode_prompt)."""
        encoder, tokenizer = self.text_encoder, self.tokenizer
        embeds = get_glyph_embeds(encoder, prompt, max_sequence_length, tokenizer=tokenizer)
        negative = (get_glyph_embeds(encoder, [""] * len(prompt), max_sequence_length, tokenizer=tokenizer)
                    if do_classifier_free_guidance else None)
        mx.eval([e for e in (embeds, negative) if e is not None])
        return _repeat(embeds, num_images_per_prompt), _repeat(negative, num_images_per_prompt)

    def _prompt_embeds(self, prompts, prompt_embeds, negative_prompt_embeds, guidance_scale, per_prompt, max_length):
        do_cfg = guidance_scale > 1.0
        if prompt_embeds is None:
            return self.encode_prompt(prompts, do_cfg, per_prompt, max_length)
        if do_cfg and negative_prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` are needed with `prompt_embeds` when guidance_scale > 1")
        return _repeat(mx.array(prompt_embeds), per_prompt), _repeat(negative_prompt_embeds, per_prompt) if do_cfg else None

    def prepare_condition_images(self, images: list[list]) -> list[list]:
        """RGB, resized once to what both the VAE and the AR model's vision encoder take (image_processor.py)."""
        ip = self.processor.image_processor
        return [[fit_condition_image(to_rgb(im), self.size_multiple, ip.shortest_edge, ip.longest_edge) for im in sample]
                for sample in images]

    def encode_condition_images(self, images: list[list]) -> list[list[tuple[mx.array, tuple[int, int]]]]:
        """Per sample, each condition image as normalized VAE latents and its (height, width) in pixels."""
        m = self.vae_scale_factor * self.patch_size
        vae = self.vae
        out = []
        for sample_images in images:
            encoded = []
            for img in sample_images:
                w0, h0 = _image_size(img)
                pixels = self.image_processor.preprocess(img, height=(h0 // m) * m, width=(w0 // m) * m)
                z = vae_codec.encode(vae, pixels.astype(vae.dtype), tiled=self.vae_tiling)
                encoded.append((vae.normalize_latents(z), tuple(pixels.shape[-2:])))
            out.append(encoded)
        return out

    def denoise_inputs(self, prompt_embeds, negative_prompt_embeds, prior_token_ids, per_prompt: int, height: int,
                       width: int, crop, guidance_scale: float) -> DenoiseInputs:
        """What each step's DiT passes read, one row per image of the run, in the DiT's dtype."""
        dtype = self.transformer.dtype
        total = prompt_embeds.shape[0]
        return DenoiseInputs(
            prompt_embeds.astype(dtype),
            negative_prompt_embeds.astype(dtype) if negative_prompt_embeds is not None else None,
            _repeat(prior_token_ids, per_prompt),
            mx.array([[height, width]] * total, dtype=mx.float32), mx.array([list(crop)] * total, dtype=mx.float32),
            guidance_scale)

    def denoise(self, latents, inputs: DenoiseInputs, kv_caches=None, callback=None, tensor_inputs=("latents",),
                progress: bool = False) -> mx.array:
        """The step loop over the scheduler's (set) timesteps."""
        on_step_end = self._step_callback(callback, tensor_inputs, inputs) if callback is not None else None
        split = self.parallel if self._mode("cfg") else None
        latents = denoise(self.transformer, self.scheduler, latents, inputs, kv_caches, on_step_end, progress, split=split)
        if kv_caches is not None:
            kv_caches.clear()
        return latents

    def _step_callback(self, callback, tensor_inputs, inputs: DenoiseInputs):
        """diffusers' protocol: ``callback(pipe, i, t, {name: tensor})`` may return replacements."""

        def on_step_end(i, t, latents):
            values = {"latents": latents, "prompt_embeds": inputs.prompt_embeds}
            returned = callback(self, i, t, {k: values[k] for k in tensor_inputs}) or {}
            if "prompt_embeds" in returned:
                inputs.prompt_embeds = returned["prompt_embeds"]
            return returned.get("latents", latents)

        return on_step_end

    def decode_latents(self, latents: mx.array) -> mx.array:
        """Denormalize and decode (B, C, h, w) latents to (B, 3, H, W) pixels in about [-1, 1]."""
        vae = self.vae
        pixels = vae_codec.decode(vae, vae.denormalize_latents(latents.astype(vae.dtype)), tiled=self.vae_tiling)
        _check_finite(pixels, "vae decode", "pixels")
        return pixels


@dataclass
class _Job:
    """One call's arguments, normalized, and what each stage leaves for the next."""

    prompts: list | None
    images: list | None
    height: int
    width: int
    key: mx.array
    guidance_scale: float
    per_prompt: int
    crop: tuple
    steps: int | None
    timesteps: list | None
    sigmas: list | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    max_sequence_length: int
    output_type: str
    callback: Callable | None
    tensor_inputs: list
    latents: mx.array | None
    prompt_embeds: mx.array | None
    negative_prompt_embeds: mx.array | None
    prior_token_ids: mx.array | None
    prior_token_image_ids: list | None
    source_image_grid_thw: list | None
    result: object = None


class StageReport:
    """Per stage (``with report(name, pipe):``): compute seconds, model-loading seconds, MLX's peak memory; and
    the AR tokens and DiT steps of the run."""

    def __init__(self, log):
        self.log, self.timings, self.load_seconds, self.peaks = log, {}, {}, {}
        self.tokens = self.steps = 0

    @contextmanager
    def __call__(self, name: str, pipe: "GlmImagePipeline"):
        mx.synchronize()
        mx.reset_peak_memory()
        t0, load0 = time.perf_counter(), pipe.load_seconds
        yield
        mx.synchronize()
        self.load_seconds[name] = pipe.load_seconds - load0
        self.timings[name] = time.perf_counter() - t0 - self.load_seconds[name]
        self.peaks[name] = mx.get_peak_memory()
        self.log(self.line(name))

    def line(self, name: str) -> str:
        rate = ""
        if name == "prior" and self.tokens:
            rate = f", {self.tokens / max(self.timings[name], 1e-9):.1f} tokens/s"
        if name == "denoising" and self.steps:
            rate = f", {self.timings[name] / self.steps:.2f} s/step"
        return (f"{name}: {self.timings[name]:.1f} s{rate} (+ {self.load_seconds[name]:.1f} s loading), "
                f"peak {self.peaks[name] / 1e9:.2f} GB")


class NonFiniteError(RuntimeError):
    """A stage produced NaN or infinite values (corrupt weights, an extreme guidance)."""


def _check_finite(x: mx.array, stage: str, what: str):
    if not mx.all(mx.isfinite(x)).item():
        raise NonFiniteError(f"the {stage} stage produced non-finite {what} (NaN or inf): the weights may be corrupt")


def _ar_tokens(height: int, width: int, editing: bool) -> int:
    """Tokens the AR model writes per prompt: the target grid (and the preview grid for text to image), then eos."""
    th, tw, ph, pw = GlmImageProcessor._get_target_shape(height, width)
    return th * tw + 1 + (0 if editing else ph * pw)


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or an (H, W, C) array."""
    return image.size if hasattr(image, "width") else (image.shape[1], image.shape[0])


def _as_ids(ids) -> mx.array:
    ids = mx.array(ids).astype(mx.int32)
    return ids[None] if ids.ndim == 1 else ids


def _repeat(x, n: int):
    return mx.repeat(x, n, axis=0) if x is not None and n > 1 else x
