"""The pipeline's components: diffusers' attribute names, each loaded on first use and kept or freed by the
memory policy; their configs, read once; one lock, so that a server's checks on one thread and its generations on
another never race. What the checkpoint says about itself is read from them once (facts.py), and the LoRA adapters
they carry live beside them (adapters.py).

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

from .. import loading
from ..models import AutoencoderKL, GlmImageForConditionalGeneration, GlmImageTransformer2DModel, T5EncoderModel
from ..quantize import as_spec
from .adapters import Adapters
from .facts import CheckpointFacts


@dataclass(frozen=True)
class Component:
    name: str
    doc: str
    stage: str  # "prior", "glyphs", "denoise" or "decode"
    model: type | None = None  # the MLX model class (None: the scheduler's config, a tokenizer or processor)
    required: bool = True  # a run needs its folder (ByT5's tokenizer needs no file: its defaults are the tokenizer)


COMPONENTS = (
    Component("vision_language_encoder", "the AR prior model (GlmImageForConditionalGeneration)", "prior",
              GlmImageForConditionalGeneration),
    Component("processor", "the AR model's tokenizer, chat template and image processor", "prior"),
    Component("text_encoder", "the ByT5 glyph encoder (T5EncoderModel)", "glyphs", T5EncoderModel),
    Component("tokenizer", "the glyph encoder's ByT5 tokenizer", "glyphs", required=False),
    Component("transformer", "the DiT (GlmImageTransformer2DModel)", "denoise", GlmImageTransformer2DModel),
    Component("scheduler", "the flow-matching schedule's config (each request's sampler is made from it)", "denoise"),
    Component("vae", "the VAE (AutoencoderKL)", "decode", AutoencoderKL),
)
BY_NAME = {c.name: c for c in COMPONENTS}
MODELS = {c.name: c.model for c in COMPONENTS if c.model is not None}
REQUIRED = tuple(c.name for c in COMPONENTS if c.required)
MEMORY_MODES = ("auto", "resident", "staged")
DEFAULT_MEMORY = "auto"  # of the pipeline's constructors and the commands' --memory
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
    """The components of one pipeline, by name.

    ``given`` components are used as they are and never freed; the others load from ``source`` (a folder or a
    Hub repo id) when first asked for. ``memory``: "resident" keeps every loaded model, "staged" frees a stage's
    models after it (``release``), "auto" picks resident when the weights take at most ``RESIDENT_SHARE`` of
    the memory budget. Configs, quantization and revision are read once; so are the checkpoint's ``facts``.
    """

    def __init__(self, *, given: dict, source, dtype, quantize, memory: str, log=None, splits: dict | None = None):
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
        self._checkpoint_facts: CheckpointFacts | None = None
        self._facts_lock = threading.Lock()  # the facts are read once, by one thread
        self.source = source
        self.dtype = loading.to_dtype(dtype)
        self.quantize = as_spec(quantize) if quantize else None  # checked now, applied as each model loads
        self.log = log or (lambda message: None)
        self.splits = splits or {}  # model name -> this rank's tensor split (sharding.Split): it loads a share
        self.loads = 0  # models loaded from files so far
        self.load_seconds = 0.0  # time spent loading them
        self.memory = self._resolve_memory(memory)
        self.adapters = Adapters(self)  # applied to each model as it loads

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
            self._checkpoint_facts = None  # read again from what is held now

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._items

    def held(self, name: str):
        """The component if it is held now (given or loaded), else None; nothing is loaded."""
        with self._lock:
            return self._items.get(name)

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
        from ..scheduler import SchedulerConfig
        from .glyphs import ByT5Tokenizer
        from .processor import GlmImageProcessor

        if name == "scheduler":
            return SchedulerConfig.from_pretrained(self.folder(name))
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
        model = loading.load_model(cls, self.source, dtype=dtype, quantize=quantize, split=self.splits.get(name))
        mx.eval(model.parameters())  # read now, so that loading is timed apart from compute
        self.adapters.apply(name, model)  # a model staged memory loads again gets its adapters again
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

    def skeleton(self, name: str):
        """The loaded model, else one built from its config.json (lazy random weights: nothing is read or made)."""
        with self._lock:
            if name in self._items:
                return self._items[name]
        folder = self.folder(name, files="*.json")
        return loading.build(MODELS[name], loading.read_config(folder), folder)

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

    # -- configs and what was loaded, read once -------------------------------------------------------------

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
    def facts(self) -> CheckpointFacts:
        """What the checkpoint says about itself (facts.py), read once (again after a component is set)."""
        with self._facts_lock:
            with self._lock:
                facts = self._checkpoint_facts
            if facts is None:
                facts = CheckpointFacts.read(self)
                with self._lock:
                    self._checkpoint_facts = facts
            return facts

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
