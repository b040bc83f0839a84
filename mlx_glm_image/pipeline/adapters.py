"""A pipeline's LoRA adapters: each one's record by name (lora.LoraAdapter: who it is, the model it is for, its
layers), the weights of the active ones, and whether they are fused. ``apply`` makes a model's layers carry exactly
the active adapters for it: when an adapter is added or the weights change (``Adapters`` does it for the models
held), and when a model loads (``Components`` calls it: a model staged memory loads again gets them again).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

from .. import loading, lora

MODELS = ("vision_language_encoder", "transformer")  # the models adapters are for


class Adapters:
    """The adapters of one pipeline; ``components`` (its ``Components``) hold the models they apply to."""

    def __init__(self, components):
        self.components = components
        self._by_name: dict[str, lora.LoraAdapter] = {}
        self.weights: dict[str, float] = {}  # the active adapters' weights, by name
        self.fused = False  # the active adapters folded into full-precision weights (lora.fuse)
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> lora.LoraAdapter:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def add(self, adapter: lora.LoraAdapter, weight: float = 1.0, rename: bool = False) -> lora.LoraAdapter:
        """Register ``adapter`` (active, at ``weight``) for the model whose linear layers it names, and apply it if
        that model is held; which model it is for and its shapes are checked now, from the configs. A name taken
        already is refused, or, with ``rename`` (a name the user did not give), the adapter gets the next free
        ``NAME_2``, ``NAME_3``, ... Returns the adapter as registered."""
        weight = lora.check_scale(weight, f"{adapter.who}: its scale")
        if adapter.name in self._by_name:
            if not rename:
                raise lora.LoraError(f"{adapter.who}: an adapter named {adapter.name!r} is loaded already; give it "
                                     "another name")
            adapter = dataclasses.replace(adapter, name=self._free_name(adapter.name))
        skeletons = {}
        for name in MODELS:
            try:
                skeletons[name] = self.components.skeleton(name)
            except loading.WeightsError:  # not in this pipeline
                continue
        adapter = lora.matched(adapter, skeletons)
        if adapter.model in self.components.splits:
            raise lora.LoraError(f"{adapter.who}: it is for the {adapter.model}, which --parallel tensor splits; LoRA "
                                 "over split layers is not supported (use --parallel cfg or data)")
        self._check_not_folded(adapter)
        with self._lock:
            self._by_name[adapter.name] = adapter
            self.weights[adapter.name] = weight
        model = self.components.held(adapter.model)
        if model is not None:
            self.apply(adapter.model, model)
        return adapter

    def _free_name(self, name: str) -> str:
        return next(f"{name}_{i}" for i in itertools.count(2) if f"{name}_{i}" not in self._by_name)

    def _check_not_folded(self, adapter: lora.LoraAdapter):
        """A converted folder whose model has this very adapter folded in (convert.py --lora records it in the
        model's config, with its SHA-256) would apply it twice: refused."""
        try:
            folder = self.components.folder(adapter.model, files="*.json")
        except loading.WeightsError:  # no source: a model given as it is
            return
        folded = loading.read_config(folder).get("lora")
        if any(isinstance(r, dict) and r.get("sha256") == adapter.sha256 for r in folded or []):
            raise lora.LoraError(f"{adapter.who}: the {adapter.model} of {self.components.source} has this adapter "
                                 "folded in already (convert --lora); loading it again would apply it twice")

    def set_weights(self, weights: dict[str, float]):
        weights = {n: lora.check_scale(w, f"the weight of adapter {n!r}") for n, w in weights.items()}
        unknown = sorted(set(weights) - set(self._by_name))
        if unknown:
            raise lora.LoraError(f"no adapter named {unknown[0]!r}; loaded: {', '.join(self._by_name) or 'none'}")
        with self._lock:
            self.weights = dict(weights)
        self._reapply()

    def clear(self):
        with self._lock:
            self._by_name, self.weights, self.fused = {}, {}, False
        self._reapply()

    def fuse(self, fused: bool):
        with self._lock:
            self.fused = fused
        self._reapply()

    def records(self) -> list[dict]:
        """The active adapters as the metadata records them."""
        return [self._by_name[n].record(w) for n, w in self.weights.items()]

    def apply(self, name: str, model):
        """Make ``model`` (the component ``name``) carry the active adapters for it, fused if asked."""
        with self._lock:
            active = [(a, self.weights[n]) for n, a in self._by_name.items() if a.model == name and n in self.weights]
            fused = self.fused
        if not active and not any(isinstance(m, (lora.LoRALinear, lora.FusedLinear)) for _, m in model.named_modules()):
            return
        lora.apply(model, active)
        if fused:
            lora.fuse(model)

    def _reapply(self):
        for name in MODELS:
            model = self.components.held(name)
            if model is not None:
                self.apply(name, model)
