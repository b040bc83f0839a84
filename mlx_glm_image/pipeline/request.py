"""One generation request, and the one vocabulary of the settings a user gives.

``Request`` is frozen and built by keywords, once, from diffusers' call arguments (``Request.from_call``), which
checks and resolves them before any model runs: the prompt as a tuple, condition images loaded and fitted, the
size, the seed and its MLX key, the AR sampling settings as the checkpoint resolves them. What the stages make
(prior tokens, embeddings, latents) lives apart from it (``stages.Job``).

``SETTINGS`` is the name table: for each setting a user gives, its name in the call (= the Request field, or
the field of its part), its command-line flag, its key in the metadata record and in prompt files, its field in
the OpenAI body, its type, its check and its help. The CLI's parser, the server's parsing, the metadata written
and read, and ``--config-from-metadata`` are all derived from it: adding a knob is a row here and its use.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import mlx.core as mx

from . import checks
from .facts import CheckpointFacts
from .image_processor import image_size
from .sample_utils import Sampler, make_sampler
from .flow import SAMPLERS
from .step_cache import SGLANG, DBCacheConfig, TaylorSeerCalibratorConfig


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """The AR prior model's sampling. ``None``: the checkpoint's generation_config.json (with transformers'
    defaults for what it leaves out), else GLM-Image's published settings; ``from_call`` resolves them."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    def sampler(self) -> Sampler:
        """The sampler the decode loop takes (sample_utils.make_sampler), once the settings are resolved."""
        return make_sampler(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """The denoising loop: its steps (or explicit ``timesteps`` / ``sigmas``), the guidance scale (diffusers'
    defaults: 50 steps, 1.5), the share of the steps guided (the first ones; the rest run the conditional pass
    alone) and the sampler that steps (a name of flow.SAMPLERS)."""

    num_inference_steps: int = 50
    timesteps: tuple | None = None
    sigmas: tuple | None = None
    guidance_scale: float = 1.5
    guidance_end: float = 1.0  # guidance on the steps before this share of them (arXiv 2404.07724's interval)
    sampler: str = "euler"

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs (an unconditional pass every step) above a scale of 1, as diffusers."""
        return self.guidance_scale > 1.0


PARTS = {"sampling": Sampling, "schedule": Schedule}
OUTPUT_TYPES = ("pil", "np", "mx", "latent")
TENSOR_INPUTS = ("latents", "prompt_embeds")  # what callback_on_step_end may read and replace


@dataclass(frozen=True, kw_only=True)
class Request:
    """diffusers' ``GlmImagePipeline.__call__`` arguments (and ``seed``, the AR sampling settings), keyword-built.

    The call's flat arguments are this class's fields and its parts' fields (``num_inference_steps`` goes to
    ``schedule``, ``temperature`` to ``sampling``). After ``from_call``: ``prompt`` is a tuple of strings (or
    None with ``prompt_embeds``), ``image`` one tuple of fitted condition images per prompt (or None), ``height``
    and ``width`` are the size to generate, ``seed`` the integer seed (None when an MLX key was given) and
    ``generator`` its MLX key, ``sampling`` the settings the AR model samples with.
    """

    prompt: Any = None
    image: Any = None  # condition images: PIL images, arrays or paths; one list per prompt for several prompts
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    generator: Any = None  # an MLX key, or an integer seed (one for the AR sampling and the noise)
    seed: int | None = None
    sampling: Sampling = Sampling()
    schedule: Schedule = Schedule()
    crops_coords_top_left: tuple = (0, 0)
    max_sequence_length: int = 2048
    output_type: str = "pil"
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: tuple = ("latents",)
    previews: int = 0  # live previews during the denoising (preview.py): "preview" events, spread over the steps
    cache_config: DBCacheConfig | None = None  # the step cache (step_cache.py); None: every block of every step
    calibrator_config: TaylorSeerCalibratorConfig | None = None  # its TaylorSeer extrapolation of cached residuals
    # what a caller may give instead of a stage's work (diffusers' arguments)
    latents: Any = None
    prompt_embeds: Any = None
    negative_prompt_embeds: Any = None
    prior_token_ids: Any = None
    prior_token_image_ids: Any = None
    source_image_grid_thw: Any = None
    image_files: tuple = field(default=(), repr=False)  # set by from_call: the condition images' paths, if paths

    @classmethod
    def arguments(cls) -> tuple[str, ...]:
        """The call's argument names: this class's fields and its parts' (diffusers' names)."""
        own = tuple(f.name for f in fields(cls) if f.name not in PARTS and f.name != "image_files")
        return own + tuple(f.name for part in PARTS.values() for f in fields(part))

    @classmethod
    def from_call(cls, facts: CheckpointFacts, **arguments) -> "Request":
        """Check and resolve one call's arguments against what the checkpoint says about itself (facts.py): the
        size rule, the largest side, the condition-image fitting and the sampling defaults. A ValueError says what
        is wrong, in one line, before any model runs."""
        unknown = sorted(set(arguments) - set(cls.arguments()))
        if unknown:
            raise TypeError(f"unexpected argument {unknown[0]!r}; the call takes {', '.join(cls.arguments())}")
        parts = {name: part(**{f.name: arguments.pop(f.name) for f in fields(part) if f.name in arguments})
                 for name, part in PARTS.items()}
        return cls(**arguments, **parts)._resolved(facts)

    @property
    def batch(self) -> int:
        """Prompts in the request (rows of ``prompt_embeds`` without a prompt)."""
        return len(self.prompt) if self.prompt is not None else self.prompt_embeds.shape[0]

    @property
    def num_images(self) -> int:
        return self.batch * self.num_images_per_prompt

    def value(self, setting: "Setting"):
        """The value of a setting of the name table."""
        return getattr(getattr(self, setting.part) if setting.part else self, setting.name)

    # -- resolving ------------------------------------------------------------------------------------------

    def _resolved(self, facts: CheckpointFacts) -> "Request":
        self._check_given()
        given_seed = self.generator if checks.is_int(self.generator) else self.seed
        if given_seed is not None:
            checks.check_seed(given_seed)
        key = self.generator if isinstance(self.generator, mx.array) else None
        seed = None if key is not None else given_seed if given_seed is not None else random.randrange(2**31)
        prompt = (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt) if self.prompt is not None else None
        if prompt is not None and self.prompt_embeds is None:
            from .glyphs import glyph_tokens

            for p in prompt:
                checks.check_glyph_length(glyph_tokens(p, self.max_sequence_length), self.max_sequence_length)
        images, files = self._condition_images(facts, len(prompt) if prompt is not None else self.prompt_embeds.shape[0])
        height, width = _size(images, self.height, self.width, facts.size_multiple)
        checks.check_size(height, width, facts.size_multiple, facts.max_side)
        if self.cache_config is not None:
            self.cache_config.check_blocks(facts.dit_blocks)
        sampling = self.sampling  # as the AR model will sample (it does not run when prior tokens are given)
        if self.prior_token_ids is None:
            facts.check_prompt_length(prompt, height, width, images)
            sampling = Sampling(**facts.sampling_settings(sampling.temperature, sampling.top_p, sampling.top_k))
        return dataclasses.replace(
            self, prompt=prompt, image=images, image_files=files, height=height, width=width, seed=seed,
            generator=key if key is not None else mx.random.key(seed), sampling=sampling,
            callback_on_step_end_tensor_inputs=tuple(self.callback_on_step_end_tensor_inputs))

    def _check_given(self):
        """diffusers' check_inputs, then every setting of the name table that was given."""
        if self.prompt is None and self.prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        if self.prompt is not None and self.prompt_embeds is not None:
            raise ValueError("Pass `prompt` or `prompt_embeds`, not both.")
        if self.prompt is None and self.prior_token_ids is None:
            raise ValueError("Provide either `prompt` or `prior_token_ids`.")
        if self.prompt_embeds is not None and self.negative_prompt_embeds is None and self.schedule.guided:
            raise ValueError("`negative_prompt_embeds` are needed with `prompt_embeds` when guidance_scale > 1")
        if (self.prior_token_image_ids is None) != (self.source_image_grid_thw is None):
            raise ValueError("`prior_token_image_ids` and `source_image_grid_thw` must be provided together for image editing.")
        if self.prior_token_image_ids is not None and (self.prior_token_ids is None or self.image is None):
            raise ValueError("`prior_token_image_ids` needs `prior_token_ids` and the condition `image` too.")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be 'pil', 'np', 'mx' or 'latent', got {self.output_type!r}")
        if not checks.is_int(self.max_sequence_length) or self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be an integer >= 1, got {checks.shown(self.max_sequence_length)}")
        if not checks.is_int(self.num_images_per_prompt) or self.num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be at least 1")
        unknown = [k for k in self.callback_on_step_end_tensor_inputs if k not in TENSOR_INPUTS]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {list(TENSOR_INPUTS)}, but found {unknown}")
        for setting in SETTINGS:
            value = self.value(setting)
            if value is not None and setting.check is not None:
                setting.check(value)
        if self.schedule.timesteps is None and self.schedule.sigmas is None:
            checks.check_steps(self.schedule.num_inference_steps)
        if not (isinstance(self.schedule.sampler, str) and self.schedule.sampler in SAMPLERS):
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {checks.shown(self.schedule.sampler)}")
        if self.cache_config is not None and self.cache_config.enable_separate_cfg is False and self.schedule.guided:
            raise ValueError("the step cache needs separate caches for the two passes of a guided step "
                             "(enable_separate_cfg): their glyph tokens differ")

    def _condition_images(self, facts: CheckpointFacts, batch: int):
        """(one tuple of fitted condition images per prompt, or None; their paths when they were given as paths)."""
        from .image_processor import load_image
        from .prior_grid import normalize_images

        per_prompt = normalize_images(self.image, batch)
        if per_prompt is None:
            return None, ()
        files = tuple(str(im) for sample in per_prompt for im in sample if _is_path(im))
        loaded = [[load_image(im) if _is_path(im) else im for im in sample] for sample in per_prompt]
        if self.prior_token_ids is None:  # the AR model will read them: fit them to what both models take
            loaded = facts.prepare_condition_images(loaded)
        return tuple(tuple(sample) for sample in loaded), files


def _is_path(x) -> bool:
    return isinstance(x, str) or hasattr(x, "__fspath__")


def _size(images, height, width, multiple: int) -> tuple[int, int]:
    """As asked, else the first condition image's rounded down to the size multiple, else 1024x1024."""
    if images is not None:
        w0, h0 = image_size(images[0][0])
        height = (h0 // multiple) * multiple if height is None else height
        width = (w0 // multiple) * multiple if width is None else width
    return 1024 if height is None else height, 1024 if width is None else width


# ---------------------------------------------------------------------------------------------------------
# The name table


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting a user gives, by its name in each vocabulary."""

    name: str  # in the call: the Request field, or the field of its ``part``
    flag: str  # on the command line
    key: str  # in the metadata record and in prompt files
    body: str | None  # in the OpenAI body (JSON or form); None: the body spells it otherwise (size, uploads)
    type: type  # int, float or str
    check: Callable[[Any], None] | None
    help: str
    part: str | None = None  # "sampling" or "schedule"
    many: bool = False  # several values on the command line (one image per seed; several condition images)
    recorded: bool = True  # it changes pixels: the metadata records it

    @property
    def default(self):
        """The call's default (None: resolved by the checkpoint or the run)."""
        owner = PARTS[self.part] if self.part else Request
        return next(f.default for f in fields(owner) if f.name == self.name)

    def from_body(self, value):
        """A body value, of its JSON type already (the server checks each field's), as the call takes it: a
        config from true, false or its fields."""
        return _config_from_body(self.type, value, self.body) if self.type in CONFIGS else value

    def to_json(self, value):
        """The value as the metadata stores it (a config as its fields by cache-dit's names)."""
        return dataclasses.asdict(value) if self.type in CONFIGS and value is not None else value

    def from_json(self, value):
        """A value the metadata or a prompt file stores, as the call takes it; a ValueError names a value of the
        wrong type (its range is the call's check)."""
        if value is None:
            return None
        if self.type in CONFIGS:
            return _config(self.type, value, self.key)
        if self.name == "image":  # a list of paths
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"image must be a path or a list of paths, got {checks.described(value)}")
            return value
        checks.check_kind(self.key, value, self.type)
        return value


CONFIGS = (DBCacheConfig, TaylorSeerCalibratorConfig)
PRESETS = {DBCacheConfig: SGLANG.cache_config, TaylorSeerCalibratorConfig: SGLANG.calibrator_config}  # what `true` is


def _config(cls, value, where: str):
    """A config from its fields by name (a JSON object); a ValueError names what does not fit."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object of {cls.__name__} fields, got {checks.shown(value)}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; {cls.__name__} has {', '.join(names)}")
    return cls(**value)


def _config_from_body(cls, value, where: str):
    """The body's form of a config: true (the published GLM-Image settings), false (off) or its fields."""
    if isinstance(value, bool):
        return PRESETS[cls] if value else None
    return _config(cls, value, where)


_SIDE = ("pixels, a multiple of 32, at most the model's largest side (the released model: 512 to 2048, at most 2^22 "
         "pixels in all; default: 1024, or the condition image's)")
_SAMPLED = "(default: the checkpoint's generation_config.json, else GLM-Image's published 0.9 / 0.75 / off)"

SETTINGS = (
    Setting(name="prompt", flag="--prompt", key="prompt", body="prompt", type=str, check=checks.check_prompt,
            help="what to draw; quote the text that must appear in the image"),
    Setting(name="image", flag="--image", key="image", body=None, type=str, check=None, many=True,
            help="condition image for editing (repeat for several)"),
    Setting(name="height", flag="--height", key="height", body=None, type=int, check=checks.check_side, help=_SIDE),
    Setting(name="width", flag="--width", key="width", body=None, type=int, check=checks.check_side, help=_SIDE),
    Setting(name="num_inference_steps", flag="--steps", key="steps", body="num_inference_steps", type=int,
            check=checks.check_steps, part="schedule", help=f"denoising steps, 1 to {checks.MAX_STEPS} (default: 50)"),
    Setting(name="guidance_scale", flag="--guidance", key="guidance", body="guidance_scale", type=float,
            check=checks.check_guidance, part="schedule",
            help="classifier-free guidance scale, >= 0; 1 or less turns it off (default: 1.5)"),
    Setting(name="guidance_end", flag="--guidance-end", key="guidance_end", body="guidance_end", type=float,
            check=checks.check_guidance_end, part="schedule",
            help="guidance on the first FRACTION of the steps only, 0 to 1: the later steps run the conditional pass "
                 "alone, about half a step's work each (default: 1, every step)"),
    Setting(name="seed", flag="--seed", key="seed", body="seed", type=int, check=checks.check_seed, many=True,
            help="one image per seed, each 0 to 2^64 - 1 (default: a random one, printed)"),
    Setting(name="temperature", flag="--temperature", key="temperature", body="temperature", type=float,
            check=checks.check_temperature, part="sampling", help=f"AR sampling temperature, > 0 {_SAMPLED}"),
    Setting(name="top_p", flag="--top-p", key="top_p", body="top_p", type=float, check=checks.check_top_p,
            part="sampling", help=f"AR nucleus sampling, in (0, 1] {_SAMPLED}"),
    Setting(name="top_k", flag="--top-k", key="top_k", body="top_k", type=int, check=checks.check_top_k,
            part="sampling", help=f"AR top-k sampling, >= 0, 0 for off {_SAMPLED}"),
    Setting(name="previews", flag="--previews", key="previews", body="partial_images", type=int,
            check=checks.check_previews, recorded=False,
            help="live previews of the denoising, spread over the steps (default: 4 with --preview-dir)"),
    Setting(name="cache_config", flag="--cache", key="cache", body="cache", type=DBCacheConfig,
            check=lambda v: checks.check_type(v, DBCacheConfig, "cache_config"),
            help="the step cache: skip the DiT's middle blocks at steps where they would barely change (faster, "
                 f"with small changes to the image); --cache turns on {SGLANG.source}"),
    Setting(name="calibrator_config", flag="--taylorseer-order", key="calibrator", body="calibrator",
            type=TaylorSeerCalibratorConfig,
            check=lambda v: checks.check_type(v, TaylorSeerCalibratorConfig, "calibrator_config"),
            help=f"the step cache's TaylorSeer extrapolation of skipped blocks (order 0: off; --cache: "
                 f"{SGLANG.calibrator_config.taylorseer_order})"),
)
BY_KEY = {s.key: s for s in SETTINGS}
