"""Tensor parallelism: each rank holds and computes a share of a model's matmul layers, with MLX's distributed
layers (``mlx.nn.layers.distributed``), as mlx-lm shards LLMs and cache-dit shards GLM-Image's DiT.

A model says how it splits (its ``tensor_plan(config, n, rank)``: a list of ``Share``, from the config alone, so
that a split that cannot work is refused before anything is read). Loading then goes in three steps:

1. ``narrow``: each planned layer becomes a plain (or quantized) layer of its share's shape, before any weight is
   read;
2. ``shares``: which slice of each stored tensor this rank reads; ``loading`` reads just those bytes from the
   safetensors files (never the whole tensor), and a load-time quantization quantizes the shares;
3. ``connect``: each layer becomes MLX's ``AllToShardedLinear`` (output split: no exchange) or
   ``ShardedToAllLinear`` (input split: an all-reduce after the matmul), or their quantized forms, with the same
   arrays.

``Split`` is the all-reduce: over the whole group, or, for ``cfg,tensor`` (the ring backend has no sub-groups),
over the whole group in slots, one slot per guidance group, so that each group sums its own ranks' parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


class ShardingError(ValueError):
    """A split the model or its quantization cannot take; one line for the user."""


@dataclass
class Split:
    """This rank's place in a tensor split: ``rank`` of ``size`` ranks sharing each model, in guidance group
    ``slot`` of ``slots`` (1 unless guidance is split too). ``rows``: with slots, the sequence length (axis 1)
    every slot pads its part to, since the two guidance passes' texts differ in length and an all-reduce needs
    the same shape everywhere (the placement sets it per run)."""

    group: mx.distributed.Group
    size: int
    rank: int
    slot: int = 0
    slots: int = 1
    rows: int = 0

    def all_sum(self, x: mx.array) -> mx.array:
        if self.slots == 1:
            return mx.distributed.all_sum(x, group=self.group)
        n = x.shape[1] if x.ndim == 3 else 0
        if n and n < self.rows:
            x = mx.pad(x, [(0, 0), (0, self.rows - n), (0, 0)])
        parts = [x if s == self.slot else mx.zeros_like(x) for s in range(self.slots)]
        out = mx.distributed.all_sum(mx.stack(parts), group=self.group)[self.slot]
        return out[:, :n] if n and n < self.rows else out


@dataclass(frozen=True)
class Share:
    """Layer ``path`` keeps ``ranges`` (start, stop) of its outputs (``axis="out"``) or of its inputs (``"in"``);
    ``slice_input``: the layer's input is whole on every rank, so the layer takes its part of it first."""

    path: str
    axis: str
    ranges: tuple[tuple[int, int], ...]
    slice_input: bool = False

    @property
    def width(self) -> int:
        return sum(b - a for a, b in self.ranges)


def part(total: int, n: int, rank: int, offset: int = 0) -> tuple[int, int]:
    """Rank ``rank``'s contiguous ``1/n`` of ``total`` (which ``n`` divides), starting at ``offset``."""
    step = total // n
    return offset + rank * step, offset + (rank + 1) * step


def require(divides: dict[str, int], n: int, what: str):
    """One line naming the first size that ``n`` ranks cannot split."""
    for name, value in divides.items():
        if value % n:
            raise ShardingError(f"--parallel tensor splits {what} over {n} ranks, but its {name} ({value}) is not a "
                                f"multiple of {n}")


# -- 1. narrow --------------------------------------------------------------------------------------------------


def _module(model: nn.Module, path: str):
    parent = model
    *head, last = path.split(".")
    for name in head:
        parent = parent[int(name)] if isinstance(parent, list) else getattr(parent, name)
    return parent, last


def _get(model, path):
    parent, last = _module(model, path)
    return parent[int(last)] if isinstance(parent, list) else getattr(parent, last)


def _set(model, path, module):
    parent, last = _module(model, path)
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


def _dims(layer) -> tuple[int, int]:
    """(input, output) widths of a linear layer, plain or quantized."""
    out, packed = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return packed * 32 // layer.bits, out
    return packed, out


def _fits(share: Share, group_size: int, bits: int = 32) -> bool:
    """An input share that holds whole quantization groups (and whole packed words)."""
    return share.axis == "out" or all(a % group_size == 0 and (a * bits) % 32 == 0 for r in share.ranges for a in r)


def check_groups(plan: list[Share], quantized: dict[str, tuple[int, int]]):
    """Refuse in one line a share that cuts a quantization group: ``quantized`` maps the planned layers that are
    (or will be) quantized to their (group size, bits)."""
    for share in plan:
        if share.path in quantized and not _fits(share, *quantized[share.path]):
            raise ShardingError(f"{share.path}: a share of {share.width} inputs does not hold whole quantization groups "
                                f"of {quantized[share.path][0]}; use fewer ranks or a smaller quantization group")


def narrow(model: nn.Module, plan: list[Share], quantized_later=(), group_size: int = 0):
    """Each planned layer becomes one of its share's shape, of the same kind (nothing is read). ``quantized_later``:
    the layers a load-time quantization (of ``group_size``) will quantize. Their shares and those of the layers a
    folder stores quantized must hold whole groups: the placement refuses that from the configs before the ranks
    exchange anything (pipeline/parallel.py); this is the guard at load time, on the layers as they are."""
    quantized = {path: (group_size, 32) for path in quantized_later}  # not packed yet: the groups decide
    for share in plan:
        layer = _get(model, share.path)
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise ShardingError(f"{share.path} is a {type(layer).__name__}, not a linear layer")
        if isinstance(layer, nn.QuantizedLinear):
            quantized[share.path] = (layer.group_size, layer.bits)
    check_groups(plan, quantized)
    for share in plan:
        layer = _get(model, share.path)
        inputs, outputs = _dims(layer)
        if share.axis == "in":
            inputs = share.width
        else:
            outputs = share.width
        bias = "bias" in layer
        if isinstance(layer, nn.QuantizedLinear):
            new = nn.QuantizedLinear(inputs, outputs, bias, layer.group_size, layer.bits, mode=layer.mode)
        else:
            new = nn.Linear(inputs, outputs, bias)
        _set(model, share.path, new)


# -- 2. shares of the stored tensors ------------------------------------------------------------------------------


def shares(model: nn.Module, plan: list[Share]) -> dict[str, tuple[int, tuple[tuple[int, int], ...]]]:
    """Per stored tensor of the planned layers: (axis, ranges) of it that this rank reads, in the tensor's own units
    (packed words and quantization groups for a quantized layer)."""
    out = {}
    for share in plan:
        layer = _get(model, share.path)
        if share.axis == "out":
            for name in ("weight", "scales", "biases", "bias"):
                if name in layer and layer[name] is not None:
                    out[f"{share.path}.{name}"] = (0, share.ranges)
            continue
        if isinstance(layer, nn.QuantizedLinear):
            words = tuple((a * layer.bits // 32, b * layer.bits // 32) for a, b in share.ranges)
            groups = tuple((a // layer.group_size, b // layer.group_size) for a, b in share.ranges)
            out[f"{share.path}.weight"] = (1, words)
            for name in ("scales", "biases"):
                if name in layer and layer[name] is not None:
                    out[f"{share.path}.{name}"] = (1, groups)
        else:
            out[f"{share.path}.weight"] = (1, share.ranges)
    return out


# -- 3. connect ----------------------------------------------------------------------------------------------------


class _SplitReduce:
    """An input-split layer's forward: its part of a whole input (``take``), the matmul, this split's all-reduce,
    the bias once."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.take is not None:
            x = x[..., self.take]
        x = self._matmul(x)
        x = self.split.all_sum(x)
        return x + self["bias"] if "bias" in self else x


class ShardedToAll(_SplitReduce, nn.ShardedToAllLinear):
    def _matmul(self, x):
        return x @ self["weight"].T


class QuantizedShardedToAll(_SplitReduce, nn.QuantizedShardedToAllLinear):
    def _matmul(self, x):
        return mx.quantized_matmul(x, self["weight"], scales=self["scales"], biases=self.get("biases"), transpose=True,
                                   group_size=self.group_size, bits=self.bits, mode=self.mode)


def connect(model: nn.Module, plan: list[Share], split: Split):
    """Each planned layer (loaded, maybe quantized) becomes MLX's distributed layer holding the same arrays."""
    g, n = split.group, split.group.size()
    for share in plan:
        layer = _get(model, share.path)
        inputs, outputs = _dims(layer)
        bias = "bias" in layer
        quantized = isinstance(layer, nn.QuantizedLinear)
        # MLX's constructors divide a width by the group's size: give them the width that leaves this share
        if share.axis == "out":
            cls = nn.QuantizedAllToShardedLinear if quantized else nn.AllToShardedLinear
            dims = (inputs, outputs * n)
        else:
            cls = QuantizedShardedToAll if quantized else ShardedToAll
            dims = (inputs * n, outputs)
        q = dict(group_size=layer.group_size, bits=layer.bits, mode=layer.mode) if quantized else {}
        new = cls(*dims, bias=bias, group=g, **q)
        new.update(layer.parameters())
        if share.axis == "in":
            new.split = split
            new.take = slice(*share.ranges[0]) if share.slice_input else None
        _set(model, share.path, new)
