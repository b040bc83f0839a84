"""GlmImagePipeline: prompt (and optional condition images) -> images, mirroring diffusers' pipeline.

Stages run one after another and each holds its weights only while it runs: the AR prior model writes the
prior tokens, the glyph encoder embeds the quoted text, the DiT denoises (with a KV cache of the condition
images when editing), the VAE decodes. Model modules never import this one; this one never reads weight
files itself (each model's from_pretrained does, through weights.py).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from . import weights as W
from .prior.sampling import normalize_images
from .scheduler import FlowMatchEulerDiscreteScheduler, classifier_free_guidance
from .transformer import GlmImageKVCache, GlmImageTransformer2DModel

DEFAULT_REPO = "zai-org/GLM-Image"


@dataclass
class GlmImagePipelineOutput:
    images: list  # PIL images, or an array (B, H, W, 3) for output_type "np", or latents for "latent"
    prior_token_ids: mx.array | None = None
    timings: dict = field(default_factory=dict)  # seconds per stage
    peak_memory: dict = field(default_factory=dict)  # bytes per stage (MLX's allocator high-water mark)


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or an (H, W, C) array."""
    return image.size if hasattr(image, "width") else (image.shape[1], image.shape[0])


def _free():
    gc.collect()
    mx.clear_cache()


class GlmImagePipeline:
    """``GlmImagePipeline.from_pretrained(path_or_repo)(prompt)`` like diffusers, in MLX.

    ``dtype`` is the compute dtype of the DiT, the AR model and the VAE (bfloat16 by default); the glyph
    encoder keeps its checkpoint dtype (float32). ``quantize`` (4 or 8 bits) quantizes the full-precision
    DiT and AR model at load time by the converter's policy; a converted folder is loaded as it is.
    """

    def __init__(self, root: Path, dtype=mx.bfloat16, quantize: int | None = None, eval_per_block: bool = True,
                 vae_tiling: bool | None = None, verbose: bool = False):
        self.root = Path(root)
        self.dtype = W.to_dtype(dtype) or mx.bfloat16
        self.quantize = quantize
        self.eval_per_block = eval_per_block
        self.vae_tiling = vae_tiling  # None: the VAE decides by size
        self.verbose = verbose
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.root / "scheduler")
        self.transformer_config = W.read_config(self.root / "transformer")
        self.vae_config = W.read_config(self.root / "vae")
        self.vae_scale_factor = 2 ** (len(self.vae_config["block_out_channels"]) - 1)
        self.patch_size = self.transformer_config.get("patch_size", 2)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path = DEFAULT_REPO, dtype="bfloat16", quantize: int | None = None, **kwargs):
        path = Path(path_or_repo).expanduser()
        if path.exists():
            if not (path / "transformer").is_dir():
                raise W.WeightsError(f"{path} is not a GLM-Image pipeline folder (no transformer/ inside)")
            return cls(path, dtype, quantize, **kwargs)
        return cls(W.resolve(path_or_repo), dtype, quantize, **kwargs)

    # -- stages (each loads, runs, frees) -------------------------------------------------------------------

    def _log(self, message: str):
        if self.verbose:
            print(message, flush=True)

    def _maybe_quantize(self, model, component: str):
        if self.quantize and not W.read_config(self.root / component).get("quantization"):
            W.quantize_in_memory(model, component, bits=self.quantize)
        return model

    def load_transformer(self) -> GlmImageTransformer2DModel:
        model = GlmImageTransformer2DModel.from_pretrained(self.root / "transformer", dtype=self.dtype)
        model = self._maybe_quantize(model, "transformer")
        model.eval_per_block = self.eval_per_block
        return model

    def load_vae(self):
        from .vae import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.root / "vae", dtype=self.dtype)

    def generate_prior_tokens(self, prompt: list[str], height: int, width: int, image=None, seed=None,
                              temperature=None, top_p=None, top_k=None, progress: bool = False):
        """The AR stage: (prior_token_ids, prior_token_image_ids per sample, source grids per sample)."""
        from .prior import GlmImageForConditionalGeneration, GlmImageProcessor, generate_prior_tokens

        if not (self.root / "vision_language_encoder").is_dir():
            raise W.WeightsError(f"{self.root} has no vision_language_encoder/ (the AR model); pass prior_token_ids instead")
        processor = GlmImageProcessor.from_pretrained(self.root / "processor")
        model = GlmImageForConditionalGeneration.from_pretrained(self.root / "vision_language_encoder", dtype=self.dtype)
        model = self._maybe_quantize(model, "vision_language_encoder")
        callback = None
        bar = None
        if progress:
            from tqdm import tqdm

            grid_h, grid_w = height // 32, width // 32
            total = grid_h * grid_w + int(np.sqrt(height / width) * 16) * int(np.sqrt(width / height) * 16) + 1
            bar = tqdm(total=total if image is None else grid_h * grid_w + 1, desc="prior tokens", unit="tok")
            callback = lambda *a, **k: bar.update(1)  # noqa: E731
        try:
            return generate_prior_tokens(model, processor, prompt, height, width, images=image, seed=seed,
                                         temperature=temperature, top_p=top_p, top_k=top_k, callback=callback)
        finally:
            if bar is not None:
                bar.close()
            del model
            _free()

    def encode_prompt(self, prompt: list[str], do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1,
                      max_sequence_length: int = 2048):
        """Glyph embeddings of the prompts and of the empty negative prompt (diffusers' encode_prompt)."""
        from .text_encoder import ByT5Tokenizer, T5EncoderModel, get_glyph_embeds

        tokenizer = ByT5Tokenizer.from_pretrained(self.root / "tokenizer") if (self.root / "tokenizer").is_dir() else ByT5Tokenizer()
        encoder = T5EncoderModel.from_pretrained(self.root / "text_encoder")
        embeds = get_glyph_embeds(encoder, prompt, max_sequence_length, tokenizer=tokenizer)
        negative = get_glyph_embeds(encoder, [""] * len(prompt), max_sequence_length, tokenizer=tokenizer) if do_classifier_free_guidance else None
        mx.eval([e for e in (embeds, negative) if e is not None])
        del encoder
        _free()
        if num_images_per_prompt > 1:
            embeds = mx.repeat(embeds, num_images_per_prompt, axis=0)
            negative = mx.repeat(negative, num_images_per_prompt, axis=0) if negative is not None else None
        return embeds, negative

    # -- checks ---------------------------------------------------------------------------------------------

    def _check_size(self, height: int, width: int):
        multiple = self.vae_scale_factor * self.patch_size * 2
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")

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
        seed: int | None = None,
        latents: mx.array | None = None,
        prompt_embeds: mx.array | None = None,
        negative_prompt_embeds: mx.array | None = None,
        prior_token_ids: mx.array | None = None,
        prior_token_image_ids: list | None = None,
        source_image_grid_thw: list | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        output_type: str = "pil",
        max_sequence_length: int = 2048,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        callback_on_step_end: Callable | None = None,
        progress: bool = False,
    ) -> GlmImagePipelineOutput:
        from .image_processor import postprocess, preprocess

        timings, peaks = {}, {}

        def stage(name, t0):
            mx.synchronize()
            timings[name] = time.perf_counter() - t0
            peaks[name] = mx.get_peak_memory()
            mx.reset_peak_memory()
            self._log(f"{name}: {timings[name]:.1f} s, peak {peaks[name] / 1e9:.2f} GB")

        # 1. inputs
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
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be at least 1")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        images = normalize_images(image, batch_size)
        multiple = self.vae_scale_factor * self.patch_size
        if images is not None and (height is None or width is None):
            w0, h0 = _image_size(images[0][0])
            height = height or (h0 // (2 * multiple)) * 2 * multiple
            width = width or (w0 // (2 * multiple)) * 2 * multiple
        height = height or 1024
        width = width or 1024
        self._check_size(height, width)
        do_cfg = guidance_scale > 1.0

        # 2. prior tokens (AR model)
        t0 = time.perf_counter()
        if prior_token_ids is None:
            prior_token_ids, prior_token_image_ids, source_image_grid_thw = self.generate_prior_tokens(
                prompts, height, width, images, seed, temperature, top_p, top_k, progress
            )
        prior_token_ids = mx.array(prior_token_ids).astype(mx.int32)
        if prior_token_ids.ndim == 1:
            prior_token_ids = prior_token_ids[None]
        stage("prior", t0)

        # 3. glyph embeddings
        t0 = time.perf_counter()
        if prompt_embeds is None:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(prompts, do_cfg, num_images_per_prompt, max_sequence_length)
        elif num_images_per_prompt > 1:
            prompt_embeds = mx.repeat(prompt_embeds, num_images_per_prompt, axis=0)
        if do_cfg and negative_prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` are needed with `prompt_embeds` when guidance_scale > 1")
        stage("glyph encoder", t0)

        # 4. latents and the condition images' KV cache
        t0 = time.perf_counter()
        transformer = self.load_transformer()
        dtype = transformer.dtype
        prompt_embeds = prompt_embeds.astype(dtype)
        negative_prompt_embeds = negative_prompt_embeds.astype(dtype) if negative_prompt_embeds is not None else None
        total = batch_size * num_images_per_prompt
        latent_shape = (total, self.transformer_config["in_channels"], height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            key = mx.random.key(seed) if seed is not None else None
            latents = mx.random.normal(latent_shape, dtype=mx.float32, key=key)
        else:
            latents = mx.array(latents).astype(mx.float32)
            if tuple(latents.shape) != latent_shape:
                raise ValueError(f"latents must have shape {latent_shape}, got {tuple(latents.shape)}")

        kv_caches = GlmImageKVCache(transformer.config.num_layers)
        if images is not None:
            vae = self.load_vae()
            kv_caches.set_mode("write")
            for sample, sample_images in enumerate(images):
                ids = mx.array(prior_token_image_ids[sample]).astype(mx.int32).reshape(-1)
                grids = np.asarray(source_image_grid_thw[sample]).reshape(-1, 3)
                sizes = [int(np.prod(g)) for g in grids]
                starts = np.cumsum([0] + sizes)
                for i, img in enumerate(sample_images):
                    w0, h0 = _image_size(img)
                    pixels = preprocess(img, height=(h0 // multiple) * multiple, width=(w0 // multiple) * multiple)
                    condition = vae.normalize_latents(vae.encode(pixels.astype(vae.dtype), tiled=self.vae_tiling))
                    transformer(
                        condition.astype(dtype),
                        mx.zeros((1, 0, prompt_embeds.shape[-1]), dtype),
                        ids[int(starts[i]) : int(starts[i + 1])],
                        mx.zeros((sizes[i],), dtype=mx.bool_),
                        mx.zeros((1,)),
                        mx.array([[pixels.shape[-2], pixels.shape[-1]]], dtype=mx.float32),
                        mx.zeros((1, 2)),
                        kv_caches=kv_caches,
                    )
                kv_caches.next_sample()
            del vae
            _free()

        # 5. denoising
        target_size = mx.array([[height, width]] * total, dtype=mx.float32)
        crop_coords = mx.array([list(crops_coords_top_left)] * total, dtype=mx.float32)
        image_seq_len = (height // self.vae_scale_factor) * (width // self.vae_scale_factor) // self.patch_size**2
        self.scheduler.set_timesteps(num_inference_steps, image_seq_len=image_seq_len, timesteps=timesteps, sigmas=sigmas)
        if num_images_per_prompt > 1:
            prior_token_ids = mx.repeat(prior_token_ids, num_images_per_prompt, axis=0)
        drop_cond = mx.zeros(prior_token_ids.shape, dtype=mx.bool_)
        drop_uncond = mx.ones(prior_token_ids.shape, dtype=mx.bool_)
        editing = images is not None
        steps = range(len(self.scheduler.timesteps))
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="denoising", unit="step")
        for i in steps:
            t = mx.full((total,), self.scheduler.model_timestep(i), dtype=mx.float32)
            x = latents.astype(dtype)
            if editing:
                kv_caches.set_mode("read")
            v = transformer(x, prompt_embeds, prior_token_ids, drop_cond, t, target_size, crop_coords, kv_caches=kv_caches).astype(mx.float32)
            if do_cfg:
                if editing:
                    kv_caches.set_mode("skip")
                v_uncond = transformer(x, negative_prompt_embeds, prior_token_ids, drop_uncond, t, target_size, crop_coords,
                                       kv_caches=kv_caches).astype(mx.float32)
                v = classifier_free_guidance(v, v_uncond, guidance_scale)
            latents = self.scheduler.step(v, i, latents)
            mx.eval(latents)
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, latents) or latents
        kv_caches.clear()
        del transformer
        _free()
        stage("denoising", t0)

        if output_type == "latent":
            return GlmImagePipelineOutput(latents, prior_token_ids, timings, peaks)

        # 6. decode
        t0 = time.perf_counter()
        vae = self.load_vae()
        decoded = vae.decode(vae.denormalize_latents(latents.astype(vae.dtype)), tiled=self.vae_tiling)
        mx.eval(decoded)
        del vae
        _free()
        stage("vae decode", t0)
        return GlmImagePipelineOutput(postprocess(decoded, output_type=output_type), prior_token_ids, timings, peaks)
