"""Autoregressive generation with a KV cache, as mlx-lm's ``generate_step``: a cached decode loop that takes a
sampler (sample_utils.make_sampler) and logits processors, and owns the evaluation: the next step is queued before
the current token is read back. It knows nothing of GLM-Image's prompt or grids (prior_grid.py).

The loop is a generator: it yields a ``Progress`` after each chunk of the prompt it reads into the cache, then each
token as it is read back, so its consumer shows progress and stops the work at a chunk or token boundary by closing
it (a long prompt's prefill is most of a request's time); its return value (``yield from``, or ``drain``) is the
sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator

import mlx.core as mx
import numpy as np

from ..models.ar.positions import decode_positions
from ..models.ar.text_model import KVCache
from .checks import NonFiniteError
from .sample_utils import Sampler, greedy

# attention windows grow in steps of this many positions: a compiled decode step per window, and a step never
# reads more than this many positions past the ones written
WINDOW = 256
PREFILL_CHUNK = 512  # prompt tokens per prefill step
# ``processor(n, logits) -> logits`` before sampling the token after ``n`` new ones (an int, or an array inside the
# compiled step): mlx-lm's logits processors, given the count instead of the tokens
LogitsProcessor = Callable[[object, mx.array], mx.array]


@dataclass(frozen=True)
class Progress:
    """Work before the first token, done in parts between which a token generator yields this: part ``index`` of
    ``total`` of ``kind`` is done ("condition": a condition image through the vision encoder, prior_grid.py;
    "prefill": a chunk of the prompt into the cache)."""

    kind: str
    index: int
    total: int


def as_key(key_or_seed=None) -> mx.array:
    """An MLX random key from a key, an integer seed, or nothing (a seed from the clock)."""
    if isinstance(key_or_seed, mx.array):
        return key_or_seed
    return mx.random.key(key_or_seed if key_or_seed is not None else time.time_ns() % (2**31))


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """What every step of one generation shares: the sampler and the logits processors, and the on-device tables
    (positions of every step, the padding mask over the whole cache)."""

    prompt_length: int
    positions: mx.array  # (3, B, max_new_tokens): the position of the token fed at each step
    attention_mask: mx.array | None  # (B, L + max_new_tokens), None without left padding
    max_new_tokens: int
    sampler: Sampler
    logits_processors: tuple[LogitsProcessor, ...] = ()

    def pick(self, logits: mx.array, n_done, key: mx.array) -> mx.array:
        """The next token after ``n_done`` new ones (an int, or an array inside the compiled step)."""
        for process in self.logits_processors:
            logits = process(n_done, logits)
        return self.sampler(logits, key)

    def window(self, i: int) -> int:
        """The positions step ``i`` reads: the ones written by then, rounded up to a multiple of ``WINDOW``."""
        return min(-(-(self.prompt_length + i + 1) // WINDOW) * WINDOW, self.prompt_length + self.max_new_tokens)

    def prefill(self, model, input_ids, position_ids, cache, key) -> Generator[Progress, None, tuple]:
        """The prompt into the cache, ``PREFILL_CHUNK`` queries at a time (mlx-lm's prefill steps): a long prompt's
        attention scores then take chunk x prompt memory, not prompt x prompt. Yields a ``Progress`` after each
        chunk it evaluates (all but the last, which is read with the first token); returns the first token after
        the prompt and whether its logits were finite."""
        L = input_ids.shape[1]
        chunks = -(-L // PREFILL_CHUNK)
        for index, start in enumerate(range(0, L, PREFILL_CHUNK)):
            end = min(start + PREFILL_CHUNK, L)
            for c in cache:
                c.window = end
            am = self.attention_mask[:, :end] if self.attention_mask is not None else None
            logits = model(input_ids[:, start:end], attention_mask=am, position_ids=position_ids[..., start:end],
                           cache=cache, logits_to_keep=1)
            if end < L:
                mx.eval([c.state for c in cache])
                yield Progress("prefill", index, chunks)
        return self.pick(logits[:, -1], 0, key), finite(logits)

    def step(self, model):
        """One decode step as a pure function of arrays, ``(tokens, step, key, cache state, window) -> (next
        tokens, whether its logits were finite, key, cache state)``, compiled: its shapes change only with the window, so it is traced once per
        window and then replayed without building the graph op by op for every token."""

        def step(tokens, i, key, state, window):
            cache = [KVCache.from_state(s, window) for s in state]
            pos = mx.take(self.positions, i, axis=2)[..., None]
            logits = model(tokens[:, None], attention_mask=self.attention_mask, position_ids=pos, cache=cache,
                           logits_to_keep=1)[:, -1]
            key, sub = mx.random.split(key)
            return self.pick(logits, i + 1, sub), finite(logits), key, [c.state for c in cache]

        return mx.compile(step)


def finite(logits: mx.array) -> mx.array:
    return mx.all(mx.isfinite(logits))


def drain(steps: Generator):
    """Run a generator to its end, dropping what it yields; its return value (the sequences, the prompt)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def generate_step(model, inputs: dict, *, max_new_tokens: int, sampler: Sampler = greedy, key=None,
                  logits_processors: tuple[LogitsProcessor, ...] = (), eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None) -> Generator[Progress | np.ndarray, None, np.ndarray]:
    """Yields a ``Progress`` after each prefill chunk but the last, then each new token, (B,) numpy ids, as it is
    read back; returns the (B, L + n) sequences.

    ``inputs``: the processor's arrays (``input_ids``; ``attention_mask``, ``image_grid_thw``,
    ``images_per_sample``, ``pixel_values`` when there are any) and, optionally, ``image_token_ids``: the source
    images' VQ ids, already computed. As transformers' ``generate``, a finished sample (eos emitted) continues with
    ``pad_token_id`` until every sample has finished. Each step is queued before the previous token is read back,
    so the host's one round-trip per token overlaps the device's work.
    """
    attention_mask, image_grid_thw = inputs.get("attention_mask"), inputs.get("image_grid_thw")
    images_per_sample = inputs.get("images_per_sample")
    input_ids = model.embed_prompt(inputs["input_ids"], inputs.get("pixel_values"), image_grid_thw, images_per_sample,
                                   inputs.get("image_token_ids"))
    B, L = input_ids.shape
    padded = attention_mask is not None and bool((np.asarray(attention_mask) == 0).any())
    position_ids, table = model.get_rope_index(input_ids, image_grid_thw, images_per_sample,
                                               np.asarray(attention_mask) if padded else None)
    if image_grid_thw is None:
        # plain causal LM positions; left padding shifts nothing here (as transformers without grids)
        position_ids = np.broadcast_to(np.arange(L), (3, B, L))
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (next(iter(eos)) if eos else 0)
    run = Decoding(
        prompt_length=L, positions=mx.array(decode_positions(table, 0, max_new_tokens, B, L)),
        attention_mask=mx.array(np.pad(np.asarray(attention_mask), [(0, 0), (0, max_new_tokens)], constant_values=1))
        if padded else None,
        max_new_tokens=max_new_tokens, sampler=sampler, logits_processors=tuple(logits_processors))
    cache = model.make_cache(L + max_new_tokens, window=L)
    key, sub = mx.random.split(as_key(key))
    tok, ok = yield from run.prefill(model, mx.array(input_ids), mx.array(position_ids), cache, sub)
    state = [c.state for c in cache]
    del cache  # the steps take the buffers over; a reference kept here would make the first step copy them
    step = run.step(model) if max_new_tokens > 1 else None
    out = []
    finished = np.zeros(B, dtype=bool)
    for i in range(max_new_tokens):
        if i + 1 < max_new_tokens:
            nxt, ok_next, key, state = step(tok, mx.array(i, dtype=mx.int32), key, state, run.window(i))
            mx.async_eval(nxt, ok_next)
        if not ok.item():  # NaN logits still sample ids in range: corrupt weights would pass unseen
            raise NonFiniteError("the prior stage produced non-finite logits (NaN or inf): the weights may be corrupt")
        t = np.where(finished, pad, np.array(tok).astype(np.int64))
        out.append(t)
        yield t
        finished |= np.isin(t, list(eos))
        if finished.all() or i + 1 == max_new_tokens:
            break
        tok, ok = nxt, ok_next
    # tokens after a sample finished were fed as sampled; they never reach the output, which is padded
    return np.concatenate([input_ids, np.stack(out, axis=1)], axis=1)
