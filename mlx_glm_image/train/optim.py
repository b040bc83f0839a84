"""The optimizer side of a training step, as torch + transformers compute it: AdamW (torch's ``AdamW``: bias
correction, weight decay decoupled), linear warm-up then cosine (transformers' ``get_cosine_schedule_with_warmup``:
the first step's learning rate is 0), clipping by the global norm (torch's ``clip_grad_norm_``), and gradients
accumulated over micro-batches (their mean: each micro-batch's loss divided by their number, as transformers'
Trainer does).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

BETAS, EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults, which the recipe keeps


def cosine_with_warmup(learning_rate: float, warmup_steps: int, steps: int):
    """The learning rate at optimizer step ``n`` (from 0): ``n / warmup`` of it during the warm-up, then half a
    cosine down to 0 at ``steps`` (transformers' ``get_cosine_schedule_with_warmup``, ``num_cycles`` 0.5)."""

    def schedule(n):
        n = mx.array(n, dtype=mx.float32)
        warm = n / max(1, warmup_steps)
        progress = (n - warmup_steps) / max(1, steps - warmup_steps)
        cosine = mx.maximum(0.0, 0.5 * (1.0 + mx.cos(math.pi * progress)))
        return learning_rate * mx.where(n < warmup_steps, warm, cosine)

    return schedule


def adamw(*, learning_rate: float, weight_decay: float, warmup_steps: int, steps: int) -> optim.AdamW:
    """MLX's AdamW with bias correction on: torch's update (the decay ``p *= 1 - lr * wd`` first, then
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``), at the schedule's rate for step ``t - 1``;
    ``steps``: optimizer steps (after accumulation), where the cosine reaches 0."""
    return optim.AdamW(learning_rate=cosine_with_warmup(learning_rate, warmup_steps, steps), betas=list(BETAS),
                       eps=EPS, weight_decay=weight_decay, bias_correction=True)


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))


def clip_grad_norm(grads, max_norm: float):
    """(grads scaled by ``min(1, max_norm / (norm + 1e-6))``, the global L2 norm before): torch's
    ``clip_grad_norm_``, which scales even just below the bound."""
    norm = global_norm(grads)
    coef = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: (g * coef).astype(g.dtype), grads), norm


class Accumulator:
    """Gradients summed over the micro-batches of one optimizer step; ``mean`` is what the step applies."""

    def __init__(self):
        self.total = None
        self.count = 0

    def add(self, grads):
        self.total = grads if self.total is None else tree_map(mx.add, self.total, grads)
        self.count += 1

    def mean(self):
        return tree_map(lambda g: g / self.count, self.total)


def apply_step(model: nn.Module, optimizer: optim.Optimizer, grads, max_grad_norm: float | None,
               loss: mx.array | None = None) -> tuple[mx.array, bool]:
    """One optimizer step on ``model``'s trainable parameters with ``grads`` (clipped first when a bound is given).
    A step whose gradients' global norm, or ``loss``, is not finite is skipped: nothing changes, the optimizer's
    step count included. Returns (the global norm before clipping, whether the step was taken)."""
    if max_grad_norm is not None:
        grads, norm = clip_grad_norm(grads, max_grad_norm)
    else:
        norm = global_norm(grads)
    finite = mx.isfinite(norm) if loss is None else mx.isfinite(norm) & mx.isfinite(loss)
    if not finite.item():
        return norm, False
    optimizer.update(model, grads)
    return norm, True
