"""Samplers as functions, as mlx-lm's ``sample_utils``: ``make_sampler(temperature, top_p, top_k)`` makes the one
callable ``sampler(logits, key) -> token ids`` that a decode loop takes (prior_tokens.generate_step); the loop knows
nothing of the settings. Each warper is transformers' (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``), applied in transformers' order; the key is explicit, so a seed gives the same tokens.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

Sampler = Callable[[mx.array, mx.array], mx.array]  # ((B, V) logits, key) -> (B,) token ids


def greedy(logits: mx.array, key: mx.array | None = None) -> mx.array:
    """The most likely token (the key is not used)."""
    return mx.argmax(logits.astype(mx.float32), axis=-1)


def make_sampler(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> Sampler:
    """A sampler for these settings: ``greedy`` at temperature 0; top-k off at 0, top-p off at 1."""
    if temperature == 0:
        return greedy
    top_k, top_p = int(top_k or 0), 1.0 if top_p is None else float(top_p)

    def sampler(logits: mx.array, key: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if temperature != 1.0:
            logits = logits / temperature
        logits = apply_top_k(logits, top_k)
        if top_p >= 1.0:
            return mx.random.categorical(logits, axis=-1, key=key)
        logits, ids = top_p_candidates(logits, top_p)
        choice = mx.random.categorical(logits, axis=-1, key=key)
        return mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]

    return sampler


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """transformers' TopKLogitsWarper (ties with the k-th logit stay); the k-th logit from a partial sort."""
    V = logits.shape[-1]
    if k <= 0 or k >= V:
        return logits
    kth = mx.partition(logits, V - k, axis=-1)[..., V - k : V - k + 1]
    return mx.where(logits < kth, -mx.inf, logits)


def top_p_candidates(logits: mx.array, p: float) -> tuple[mx.array, mx.array]:
    """transformers' TopPLogitsWarper in sorted order: (logits, token ids), both ascending by logit, with the
    smallest tokens whose cumulative probability is <= 1 - p at -inf. Sampling then picks a position here and
    reads its id, so the mask never has to be scattered back to vocabulary order."""
    order = mx.argsort(logits, axis=-1)
    logits = mx.take_along_axis(logits, order, axis=-1)
    cum = mx.cumsum(mx.softmax(logits, axis=-1), axis=-1)
    n = logits.shape[-1]
    remove = (cum <= (1 - p)) & (mx.arange(n) < n - 1)  # the most likely token always stays
    return mx.where(remove, -mx.inf, logits), order
