"""The pipeline's components: diffusers' attribute names, each loaded on first use and kept or freed by the
memory policy; the checkpoint's facts, read once from its config files; one lock, so that a server's checks on
one thread and its generations on another never race.

``COMPONENTS`` is the one table of them: name, what it is, the stage that uses it (staged memory frees a model
after its stage), its MLX model class for the four models, and whether a run needs its folder.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .. import loading, lora
from ..models import AutoencoderKL, GlmImageForConditionalGeneration, GlmImageTransformer2DModel, T5EncoderModel
from ..quantize import as_spec


@dataclass(frozen=True)
class Component:
    name: str
    doc: str
    stage: str  # "prior", "glyphs", "denoise" or "decode"
    model: type | None = None  # the MLX model class (None: a scheduler, tokenizer or processor)
    required: bool = True  # a run needs its folder (ByT5's tokenizer needs no file: its defaults are the tokenizer)


COMPONENTS = (
    Component("vision_language_encoder", "the AR prior model (GlmImageForConditionalGeneration)", "prior",
              GlmImageForConditionalGeneration),
    Component("processor", "the AR model's tokenizer, chat template and image processor", "prior"),
    Component("text_encoder", "the ByT5 glyph encoder (T5EncoderModel)", "glyphs", T5EncoderModel),
    Component("tokenizer", "the glyph encoder's ByT5 tokenizer", "glyphs", required=False),
    Component("transformer", "the DiT (GlmImageTransformer2DModel)", "denoise", GlmImageTransformer2DModel),
    Component("scheduler", "the flow-matching Euler scheduler", "denoise"),
    Component("vae", "the VAE (AutoencoderKL)", "decode", AutoencoderKL),
)
BY_NAME = {c.name: c for c in COMPONENTS}
MODELS = {c.name: c.model for c in COMPONENTS if c.model is not None}
REQUIRED = tuple(c.name for c in COMPONENTS if c.required)
MEMORY_MODES = ("auto", "resident", "staged")
# "auto" keeps every component resident when their weights take at most this share of the memory budget; the
# rest is left for activations (the DiT's at 2048x2048, the VAE's decode) and for the system.
RESIDENT_SHARE = 0.6


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


class Components:
    """The components of one pipeline, by name, and what the checkpoint says about itself.

    ``given`` components are used as they are and never freed; the others load from ``source`` (a folder or a
    Hub repo id) when first asked for. ``memory``: "resident" keeps every loaded model, "staged" frees a stage's
    models after it (``release``), "auto" picks resident when the weights take at most ``RESIDENT_SHARE`` of
    the memory budget. Facts (sizes, the largest side, sampling defaults, quantization, revision) are read once.
    """

    def __init__(self, given: dict, source=None, dtype=mx.bfloat16, quantize=None, memory: str = "resident", log=None,
                 splits: dict | None = None):
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        unknown = sorted(set(given) - set(BY_NAME))
        if unknown:
            raise ValueError(f"unknown component {unknown[0]!r}; the pipeline has {', '.join(BY_NAME)}")
        self._items = {k: v for k, v in given.items() if v is not None}
        self._loaded: set[str] = set()  # the models loaded here (staged memory frees only those)
        self._lock = threading.RLock()  # guards the items and the facts (held briefly, never while loading)
        self._loading: dict[str, threading.Lock] = {}  # one per component: a model loads once
        self._facts: dict = {}
        self.source = source
        self.dtype = loading.to_dtype(dtype)
        self.quantize = as_spec(quantize) if quantize else None  # checked now, applied as each model loads
        self.log = log or (lambda message: None)
        self.splits = splits or {}  # model name -> this rank's tensor split (sharding.Split): it loads a share
        self.loads = 0  # models loaded from files so far
        self.load_seconds = 0.0  # time spent loading them
        self.memory = self._resolve_memory(memory)
        self.adapters: dict[str, tuple] = {}  # LoRA adapters by name: (lora.LoraAdapter, the component it is for)
        self.adapter_weights: dict[str, float] = {}  # the active ones, by name
        self.fused = False  # the active adapters folded into full-precision weights (lora.fuse)

    # -- the components -------------------------------------------------------------------------------------

    def get(self, name: str):
        with self._lock:
            if name in self._items:
                return self._items[name]
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            with self._lock:
                if name in self._items:  # another thread loaded it meanwhile
                    return self._items[name]
            value = self._load(name)
            with self._lock:
                self._items[name] = value
                if BY_NAME[name].model is not None:
                    self._loaded.add(name)
            return value

    def set(self, name: str, value):
        with self._lock:
            self._items[name] = value
            self._loaded.discard(name)

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._items

    def missing(self, names=REQUIRED) -> list[str]:
        """Which of ``names`` a local pipeline folder lacks (a Hub source is asked when a component is used)."""
        if self.source is not None and not loading.is_local(self.source):
            return []
        with self._lock:
            return [n for n in names if n not in self._items
                    and (self.source is None or not (Path(self.source) / n).is_dir())]

    def release(self, *stages: str):
        """After a stage, in staged memory: free the models of ``stages`` that were loaded here (all stages when
        none is named)."""
        if self.memory != "staged":
            return
        with self._lock:
            for name in list(self._loaded):
                if not stages or BY_NAME[name].stage in stages:
                    self._items.pop(name, None)
                    self._loaded.discard(name)
        gc.collect()
        mx.clear_cache()

    def _load(self, name: str):
        from ..scheduler import FlowMatchEulerDiscreteScheduler
        from .glyphs import ByT5Tokenizer
        from .processor import GlmImageProcessor

        if name == "scheduler":
            return FlowMatchEulerDiscreteScheduler.from_pretrained(self.folder(name))
        if name == "processor":
            return GlmImageProcessor.from_pretrained(self.folder(name))
        if name == "tokenizer":
            try:
                return ByT5Tokenizer.from_pretrained(self.folder(name))
            except loading.WeightsError:  # ByT5 needs no vocabulary file: its defaults are the tokenizer
                return ByT5Tokenizer()
        t0 = time.perf_counter()
        cls = MODELS[name]
        quantize = self.quantize if cls.quantize_by_default else None
        dtype = None if name == "text_encoder" else self.dtype  # ByT5 keeps its checkpoint's float32
        model = cls.from_pretrained(self.source, dtype=dtype, quantize=quantize, split=self.splits.get(name))
        mx.eval(model.parameters())  # read now, so that loading is timed apart from compute
        self._apply_adapters(name, model)  # a model staged memory loads again gets its adapters again
        seconds = time.perf_counter() - t0
        with self._lock:
            self.loads += 1
            self.load_seconds += seconds
        self.log(f"loaded {name} in {seconds:.1f} s")
        return model

    def folder(self, name: str, files: str = "*") -> Path:
        if self.source is None:
            raise loading.WeightsError(f"this pipeline has no {name} and no source to load it from")
        return loading.component_folder(self.source, name, files=files)

    # -- LoRA adapters ---------------------------------------------------------------------------------------

    def add_adapter(self, adapter: lora.LoraAdapter, weight: float = 1.0) -> str:
        """Register ``adapter`` (active, at ``weight``) for the model whose linear layers it names, and apply it if
        that model is loaded; which model it is for and its shapes are checked now, from the configs."""
        if adapter.name in self.adapters:
            raise lora.LoraError(f"an adapter named {adapter.name!r} is loaded already")
        skeletons = {}
        for name in ("vision_language_encoder", "transformer"):
            try:
                skeletons[name] = self.skeleton(name)
            except loading.WeightsError:  # not in this pipeline
                continue
        component = lora.component_of(adapter, skeletons)
        if component in self.splits:
            raise lora.LoraError(f"adapter {adapter.name!r} is for the {component}, which --parallel tensor splits; "
                                 "LoRA over split layers is not supported (use --parallel cfg or data)")
        with self._lock:
            self.adapters[adapter.name] = (adapter, component)
            self.adapter_weights[adapter.name] = weight
            model = self._items.get(component)
        if model is not None:
            self._apply_adapters(component, model)
        return component

    def set_adapter_weights(self, weights: dict[str, float]):
        unknown = sorted(set(weights) - set(self.adapters))
        if unknown:
            raise lora.LoraError(f"no adapter named {unknown[0]!r}; loaded: {', '.join(self.adapters) or 'none'}")
        with self._lock:
            self.adapter_weights = dict(weights)
        self._reapply()

    def remove_adapters(self):
        with self._lock:
            self.adapters, self.adapter_weights, self.fused = {}, {}, False
        self._reapply()

    def fuse_adapters(self, fused: bool):
        with self._lock:
            self.fused = fused
        self._reapply()

    def adapter_records(self) -> list[dict]:
        """The active adapters as the metadata records them."""
        return [lora.record(self.adapters[n][0], w, self.adapters[n][1]) for n, w in self.adapter_weights.items()]

    def skeleton(self, name: str):
        """The loaded model, else one built from its config.json (lazy random weights: nothing is read or made)."""
        with self._lock:
            if name in self._items:
                return self._items[name]
        folder = self.folder(name, files="*.json")
        return loading.build(MODELS[name], loading.read_config(folder), folder)

    def _reapply(self):
        for name in {c for _, c in self.adapters.values()} | {"vision_language_encoder", "transformer"}:
            with self._lock:
                model = self._items.get(name)
            if model is not None:
                self._apply_adapters(name, model)

    def _apply_adapters(self, name: str, model):
        active = [(a, self.adapter_weights[n]) for n, (a, c) in self.adapters.items()
                  if c == name and n in self.adapter_weights]
        if not active and not any(isinstance(m, (lora.LoRALinear, lora.FusedLinear)) for _, m in model.named_modules()):
            return
        lora.apply(model, active)
        if self.fused:
            lora.fuse(model)

    # -- memory ---------------------------------------------------------------------------------------------

    def _resolve_memory(self, memory: str) -> str:
        if memory != "auto":
            return memory
        if self.source is None:
            return "resident"
        try:
            weights = sum(self.weight_bytes(name) for name in MODELS if name not in self._items)
        except loading.WeightsError:  # a component is missing: it will say so when it is needed
            return "staged"
        return "resident" if weights <= RESIDENT_SHARE * memory_budget() else "staged"

    def weight_bytes(self, name: str) -> int:
        """A model's bytes once loaded, from its files (only the json files are fetched from the Hub)."""
        folder = self.folder(name, files="*.json")
        size = loading.weight_bytes(folder)
        bits = self.quantize.bits if self.quantize else None
        if bits and MODELS[name].quantize_by_default and not loading.read_config(folder).get("quantization"):
            size = size * bits // 16  # the released weights are bf16
        if name in self.splits:  # most of it is split (the token table, the heads and the vision side stay whole)
            size //= self.splits[name].size
        return size

    # -- facts, read once -----------------------------------------------------------------------------------

    def _fact(self, name: str, read):
        with self._lock:
            if name not in self._facts:
                self._facts[name] = read()
            return self._facts[name]

    def config(self, name: str):
        """A model's config dataclass: the given or loaded model's, else its folder's config.json."""
        with self._lock:
            if name in self._items:
                return self._items[name].config

        def read():
            folder = self.folder(name, files="*.json")
            return loading.model_config(MODELS[name], loading.read_config(folder), folder)

        return self._fact(f"config/{name}", read)

    @property
    def vae_scale_factor(self) -> int:
        return self.config("vae").scale_factor

    @property
    def patch_size(self) -> int:
        return self.config("transformer").patch_size

    @property
    def latent_channels(self) -> int:
        return self.config("transformer").in_channels

    @property
    def dit_blocks(self) -> int:
        return self.config("transformer").num_layers

    @property
    def size_multiple(self) -> int:
        """Heights and widths are multiples of this: the AR model's token grid is half the DiT's."""
        return self.vae_scale_factor * self.patch_size * 2

    @property
    def max_side(self) -> int | None:
        """The largest image side the AR model takes (its vision config's image_size), when there is one."""

        def read():
            if not self.holds("vision_language_encoder") and self.missing(["vision_language_encoder"]):
                return None
            try:
                return self.config("vision_language_encoder").vision_config.image_size
            except loading.WeightsError:
                return None

        return self._fact("max_side", read)

    def generation_config(self) -> dict:
        """The AR model's generation_config.json ({} without one), from the loaded model or the files."""
        with self._lock:
            if "vision_language_encoder" in self._items:
                return self._items["vision_language_encoder"].generation_config

        def read():
            if self.missing(["vision_language_encoder"]):  # it says so if a stage needs it
                return {}
            folder = self.folder("vision_language_encoder", files="*.json")
            path = folder / "generation_config.json"
            return loading.read_config(folder, path.name) if path.is_file() else {}

        return self._fact("generation_config", read)

    def sampling_settings(self, temperature=None, top_p=None, top_k=None) -> dict:
        """The AR sampling settings a call with these arguments uses (read from the checkpoint's files only)."""
        from .prior_tokens import sampling_settings

        return sampling_settings(self.generation_config(), temperature, top_p, top_k)

    def check_prompt_length(self, prompts, height: int, width: int, images=None):
        """Each prompt's AR sequence (its tokens, its condition images', the grid it writes) fits the model's
        max_position_embeddings; read from the configs and the tokenizer only."""
        from . import checks
        from .request import image_size

        if self.missing(["vision_language_encoder", "processor"]):
            return  # the stage that needs them says so
        limit = self.config("vision_language_encoder").text_config.max_position_embeddings
        processor = self.get("processor")
        for prompt, sample in zip(prompts, images or [()] * len(prompts)):
            sizes = [image_size(im) for im in sample]
            checks.check_sequence_length(processor.sequence_length(prompt, height, width, sizes), limit)

    def prepare_condition_images(self, images: list[list]) -> list[list]:
        """RGB, resized once to what both the VAE and the AR model's vision encoder take (image_processor.py)."""
        from .image_processor import fit_condition_image, to_rgb

        ip = self.get("processor").image_processor
        return [[fit_condition_image(to_rgb(im), self.size_multiple, ip.shortest_edge, ip.longest_edge) for im in sample]
                for sample in images]

    def revision(self) -> str | None:
        """The Hub commit the components come from (its snapshot folder's name); None for a local folder."""
        if self.source is None or loading.is_local(self.source):
            return None
        return self._fact("revision", lambda: self.folder("transformer", files="*.json").parent.name)

    def quantization(self) -> dict:
        """Per model: the quantization it runs with (a converted folder's, or load-time ``quantize``), or None."""

        def read():
            out = {}
            for name, cls in MODELS.items():
                if self.missing([name]) or self.source is None:
                    continue
                try:
                    stored = loading.read_config(self.folder(name, files="*.json")).get("quantization")
                except loading.WeightsError:  # a Hub repo without it: not part of this pipeline
                    continue
                if stored is None and self.quantize and cls.quantize_by_default:
                    stored = self.quantize.as_config()
                out[name] = {k: stored[k] for k in ("bits", "group_size", "mode") if k in stored} if stored else None
            return out

        return self._fact("quantization", read)
