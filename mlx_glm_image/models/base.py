"""What every model shares: its config dataclass read from config.json, its quantization predicate, and the
hooks the loader calls.

Models never read files and know no loader: ``loading.load_model(cls, path_or_repo)`` builds one from outside (as
mlx-lm's ``load_model``), so that the imports point one way (loading -> models).
"""

from __future__ import annotations

import dataclasses

import mlx.nn as nn


# Fields annotated with one of these plain types are checked: a config.json with "num_layers": "two" is refused
# in one line instead of failing somewhere inside the model.
_PLAIN_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def config_from_dict(cls, config: dict, exclude: tuple[str, ...] = ()):
    """A config dataclass from a config.json dict; the reference's other keys (_class_name, ...) are ignored."""
    if not isinstance(config, dict):
        raise ValueError(f"a {cls.__name__} needs a JSON object, got {type(config).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    for name, value in config.items():
        kinds = _PLAIN_TYPES.get(str(fields[name].type)) if name in fields else None
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise ValueError(f"{name} must be {fields[name].type}, got {value!r}")
    return cls(**{k: v for k, v in config.items() if k in fields})


class PretrainedModel(nn.Module):
    """Base of the four models. Subclasses set ``component`` (their folder in a pipeline checkpoint) and may
    override ``sanitize`` (the reference's layouts -> ours), ``quant_predicate`` and ``load_dtype``, which
    ``loading.load_model`` calls."""

    component = ""
    config_class = None  # the config dataclass; it has from_dict(config.json)
    # Quantized by `convert -q` and by load-time quantization unless the user names the components.
    quantize_by_default = False
    # Why the layers that quant_predicate refuses stay in full precision (shown by the converter).
    full_precision_note = ""

    @staticmethod
    def tensor_plan(config, n: int, rank: int) -> list:
        """The layers ``n`` ranks split and rank ``rank``'s share of each (``sharding.Share``), from the config
        alone; raises ``sharding.ShardingError`` when ``n`` does not divide what must be split."""
        from ..sharding import ShardingError

        raise ShardingError("this model is not split by --parallel tensor")

    def shard_heads(self, n: int):
        """After ``tensor_plan``'s layers are narrowed: each attention runs its share of the heads."""

    @classmethod
    def as_config(cls, config):
        """The config dataclass from itself, a config.json dict, or None (the defaults)."""
        return config if isinstance(config, cls.config_class) else cls.config_class.from_dict(config or {})

    @staticmethod
    def sanitize(weights: dict) -> dict:
        return weights

    def quant_predicate(self, path: str, module: nn.Module) -> bool:
        """Whether a layer may be quantized (the group size decides the rest): every linear layer by default."""
        return isinstance(module, nn.Linear)

    @classmethod
    def load_dtype(cls, config, dtype):
        """The dtype to load in when ``dtype`` is asked (a model may refuse one it overflows in)."""
        return dtype

    def after_load(self):
        """Adjust parameters once loaded (e.g. keep a layer in float32)."""
