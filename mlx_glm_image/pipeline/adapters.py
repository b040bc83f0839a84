"""A pipeline's LoRA adapters: each one's record by name (lora.LoraAdapter: who it is, the model it is for, its
layers), the weights of the active ones, and whether they are fused. ``apply`` makes a model's layers carry exactly
the active adapters for it: when an adapter is added or the weights change (``Adapters`` does it for the models
held), and when a model loads (``Components`` calls it: a model staged memory loads again gets them again).
"""

from __future__ import annotations

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

    def add(self, adapter: lora.LoraAdapter, weight: float = 1.0) -> lora.LoraAdapter:
        """Register ``adapter`` (active, at ``weight``) for the model whose linear layers it names, and apply it if
        that model is held; which model it is for and its shapes are checked now, from the configs."""
        if adapter.name in self._by_name:
            raise lora.LoraError(f"an adapter named {adapter.name!r} is loaded already")
        skeletons = {}
        for name in MODELS:
            try:
                skeletons[name] = self.components.skeleton(name)
            except loading.WeightsError:  # not in this pipeline
                continue
        adapter = lora.matched(adapter, skeletons)
        if adapter.model in self.components.splits:
            raise lora.LoraError(f"adapter {adapter.name!r} is for the {adapter.model}, which --parallel tensor "
                                 "splits; LoRA over split layers is not supported (use --parallel cfg or data)")
        with self._lock:
            self._by_name[adapter.name] = adapter
            self.weights[adapter.name] = weight
        model = self.components.held(adapter.model)
        if model is not None:
            self.apply(adapter.model, model)
        return adapter

    def set_weights(self, weights: dict[str, float]):
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
