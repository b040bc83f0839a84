"""The prior-token stage: logits warpers as transformers applies them, a cached decode loop (which owns the
evaluation: the next step is queued before the current token is read back), diffusers' static helpers, and
``generate_prior_tokens`` with the return value of diffusers' ``GlmImagePipeline.generate_prior_tokens``.

As mlx-lm's ``generate_step``, the loop is a generator (``generate_step``, ``prior_sequences``): it yields each
token as it is read back, so its consumer shows progress and stops the work at a token boundary by closing it;
its return value (``yield from``) is the sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generator

import mlx.core as mx
import numpy as np

from ..models.ar.positions import decode_positions
from ..models.ar.text_model import KVCache
from .checks import NonFiniteError

# attention windows grow in steps of this many positions: a compiled decode step per window, and a step never
# reads more than this many positions past the ones written
WINDOW = 256
PREFILL_CHUNK = 512  # prompt tokens per prefill step
# transformers' GenerationConfig defaults, for the keys a generation_config.json leaves out
DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
# GLM-Image's published sampling settings (docs/checkpoint.md), for a checkpoint without generation_config.json
PUBLISHED = {"temperature": 0.9, "top_k": 0, "top_p": 0.75}


def as_key(key_or_seed=None) -> mx.array:
    """An MLX random key from a key, an integer seed, or nothing (a seed from the clock)."""
    if isinstance(key_or_seed, mx.array):
        return key_or_seed
    return mx.random.key(key_or_seed if key_or_seed is not None else time.time_ns() % (2**31))


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


def sample(logits: mx.array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           key: mx.array | None = None, do_sample: bool = True) -> mx.array:
    """(B, V) logits -> (B,) token ids. Greedy when ``do_sample`` is False or temperature is 0."""
    logits = logits.astype(mx.float32)
    if not do_sample or temperature == 0:
        return mx.argmax(logits, axis=-1)
    if temperature != 1.0:
        logits = logits / temperature
    logits = apply_top_k(logits, int(top_k or 0))
    if top_p is None or top_p >= 1.0:
        return mx.random.categorical(logits, axis=-1, key=key)
    logits, ids = top_p_candidates(logits, float(top_p))
    choice = mx.random.categorical(logits, axis=-1, key=key)
    return mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


@dataclass
class Decoding:
    """What every step of one generation shares: the sampling settings, the end-token rules and the on-device
    tables (positions of every step, the padding mask over the whole cache)."""

    prompt_length: int
    positions: mx.array  # (3, B, max_new_tokens): the position of the token fed at each step
    attention_mask: mx.array | None  # (B, L + max_new_tokens), None without left padding
    is_eos: mx.array  # (V,) bool
    max_new_tokens: int
    min_new_tokens: int
    forced_eos_token_id: int | None
    sampling: dict  # temperature, top_k, top_p, do_sample

    def pick(self, logits: mx.array, n_done, key: mx.array) -> mx.array:
        """The next token after ``n_done`` new ones (an int, or an array inside the compiled step)."""
        logits = mx.where(self.is_eos & (n_done < self.min_new_tokens), -mx.inf, logits)
        if self.forced_eos_token_id is not None:
            forced = mx.where(mx.arange(logits.shape[-1]) == self.forced_eos_token_id, 0.0, -mx.inf)
            logits = mx.where(n_done == self.max_new_tokens - 1, forced, logits)
        return sample(logits, key=key, **self.sampling)

    def window(self, i: int) -> int:
        """The positions step ``i`` reads: the ones written by then, rounded up to a multiple of ``WINDOW``."""
        return min(-(-(self.prompt_length + i + 1) // WINDOW) * WINDOW, self.prompt_length + self.max_new_tokens)

    def prefill(self, model, input_ids, position_ids, cache, key) -> mx.array:
        """The prompt into the cache, ``PREFILL_CHUNK`` queries at a time (mlx-lm's prefill steps): a long prompt's
        attention scores then take chunk x prompt memory, not prompt x prompt; the first token after it."""
        L = input_ids.shape[1]
        for start in range(0, L, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, L)
            for c in cache:
                c.window = end
            am = self.attention_mask[:, :end] if self.attention_mask is not None else None
            logits = model(input_ids[:, start:end], attention_mask=am, position_ids=position_ids[..., start:end],
                           cache=cache, logits_to_keep=1)
            if end < L:
                mx.eval([c.state for c in cache])
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


def generate(*args, callback=None, **kwargs) -> np.ndarray:
    """Autoregressive generation with a KV cache; returns (B, L + n) numpy ids like transformers' ``generate``.
    Takes ``generate_step``'s arguments; ``callback(i, tokens)`` sees each token."""
    return drain(generate_step(*args, **kwargs), callback)


def drain(steps: Generator, callback=None):
    """Run a token generator to its end; its return value (the sequences)."""
    i = 0
    while True:
        try:
            tokens = next(steps)
        except StopIteration as done:
            return done.value
        if callback is not None:
            callback(i, tokens)
        i += 1


def generate_step(model, input_ids, attention_mask=None, image_grid_thw=None, images_per_sample=None,
                  max_new_tokens: int = 1, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, key=None, eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None, image_token_ids=None, pixel_values=None, min_new_tokens: int = 0,
                  forced_eos_token_id: int | None = None) -> Generator[np.ndarray, None, np.ndarray]:
    """Yields each new token, (B,) numpy ids, as it is read back; returns the (B, L + n) sequences.

    A finished sample (eos emitted) continues with ``pad_token_id`` until every sample has finished. As in
    transformers, ``min_new_tokens`` masks the eos tokens until that many tokens are out, and
    ``forced_eos_token_id`` is the only choice for the last of ``max_new_tokens``. Each step is queued before
    the previous token is read back, so the host's one round-trip per token overlaps the device's work.
    """
    input_ids = model.embed_prompt(input_ids, pixel_values, image_grid_thw, images_per_sample, image_token_ids)
    B, L = input_ids.shape
    padded = attention_mask is not None and bool((np.asarray(attention_mask) == 0).any())
    position_ids, table = model.get_rope_index(input_ids, image_grid_thw, images_per_sample,
                                               np.asarray(attention_mask) if padded else None)
    if image_grid_thw is None:
        # plain causal LM positions; left padding shifts nothing here (as transformers without grids)
        position_ids = np.broadcast_to(np.arange(L), (3, B, L))
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (next(iter(eos)) if eos else 0)
    V = model.config.text_config.vision_vocab_size
    run = Decoding(
        prompt_length=L, positions=mx.array(decode_positions(table, 0, max_new_tokens, B, L)),
        attention_mask=mx.array(np.pad(np.asarray(attention_mask), [(0, 0), (0, max_new_tokens)], constant_values=1))
        if padded else None,
        is_eos=mx.array(np.isin(np.arange(V), list(eos))), max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, forced_eos_token_id=forced_eos_token_id,
        sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample))
    cache = model.make_cache(L + max_new_tokens, window=L)
    key, sub = mx.random.split(as_key(key))
    tok, ok = run.prefill(model, mx.array(input_ids), mx.array(position_ids), cache, sub)
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


# ---- diffusers' post-processing (static helpers of GlmImagePipeline) -----------------------------------------
def compute_generation_params(image_grid_thw, is_text_to_image: bool) -> tuple[int, int, int, int]:
    """(max_new_tokens, large_image_start_offset, target_grid_h, target_grid_w) of one sample's grids."""
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    sizes = [int(h * w) for _, h, w in grids]
    if not is_text_to_image:
        return sizes[-1] + 1, 0, int(grids[-1][1]), int(grids[-1][2])
    return sum(sizes) + 1, sum(sizes[1:]), int(grids[0][1]), int(grids[0][2])


def extract_large_image_tokens(generated: np.ndarray, input_length: int, offset: int, n: int) -> np.ndarray:
    return np.asarray(generated)[input_length:][offset : offset + n]


def upsample_token_ids(token_ids, h: int, w: int) -> np.ndarray:
    """(h*w,) ids -> (4*h*w,) ids of the 2x nearest-upsampled grid."""
    g = np.asarray(token_ids).reshape(h, w)
    return np.repeat(np.repeat(g, 2, axis=0), 2, axis=1).reshape(-1)


def normalize_images(images, batch_size: int):
    """None, or one list of condition images per prompt (diffusers' _validate_and_normalize_images rules)."""
    if images is None or (isinstance(images, (list, tuple)) and len(images) == 0):
        return None
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not isinstance(images[0], (list, tuple)):
        if batch_size != 1:
            raise ValueError("for a batch of prompts, images must be one list of condition images per prompt")
        return [list(images)]
    if len(images) != batch_size:
        raise ValueError(f"Number of image lists ({len(images)}) must match batch size ({batch_size}).")
    if len({len(x) for x in images}) != 1:
        raise ValueError("All prompts must have the same number of condition images.")
    return [list(x) for x in images]


@dataclass
class PriorPrompt:
    """The AR model's input for a batch of prompts, and where its target grid will be in the output."""

    inputs: dict  # the processor's arrays (input_ids, attention_mask, image_grid_thw, images_per_sample, ...)
    max_new_tokens: int
    offset: int  # of the target grid among the generated tokens
    grid: tuple[int, int]  # target grid (h, w), on the AR's d32 token grid
    image_ids: np.ndarray | None = None  # the source images' VQ ids, in placeholder order
    prior_token_image_ids: list | None = None  # per sample, upsampled 2x (diffusers' return value)
    source_image_grid_thw: list | None = None  # per sample, h and w doubled


def prior_prompt(model, processor, prompts: list[str], height: int, width: int, images=None) -> PriorPrompt:
    """Chat template + tokens (+ the condition images' VQ tokens) for an ``height`` x ``width`` image."""
    images = normalize_images(images, len(prompts))
    t2i = images is None
    conversations = [
        [{"role": "user", "content": ([] if t2i else [{"type": "image", "image": im} for im in images[i]])
          + [{"type": "text", "text": p}]}]
        for i, p in enumerate(prompts)
    ]
    inputs = processor.apply_chat_template(conversations, target_h=height, target_w=width, padding=len(prompts) > 1)
    grids = inputs["image_grid_thw"]
    n_new, offset, th, tw = compute_generation_params(grids[: int(inputs["images_per_sample"][0])], t2i)
    prompt = PriorPrompt(inputs, n_new, offset, (th, tw))
    if not t2i:
        _add_source_images(model, prompt, len(images[0]))
    return prompt


def _add_source_images(model, prompt: PriorPrompt, n_src: int):
    inputs = prompt.inputs
    src = model.source_grids(inputs["image_grid_thw"], inputs["images_per_sample"])
    image_ids = np.array(model.get_image_tokens(model.get_image_features(mx.array(inputs["pixel_values"]), src)))
    bounds = np.cumsum([0] + [int(np.prod(g)) for g in src])
    up = [upsample_token_ids(image_ids[bounds[i]:bounds[i + 1]], int(g[1]), int(g[2])) for i, g in enumerate(src)]
    up_grids = src.copy()
    up_grids[:, 1:] *= 2
    batch = len(inputs["input_ids"])
    prompt.image_ids = image_ids
    prompt.prior_token_image_ids = [mx.array(np.concatenate(up[i * n_src:(i + 1) * n_src]).astype(np.int32))
                                    for i in range(batch)]
    prompt.source_image_grid_thw = [mx.array(up_grids[i * n_src:(i + 1) * n_src].astype(np.int32)) for i in range(batch)]


def sampling_settings(generation_config: dict | None, temperature=None, top_p=None, top_k=None) -> dict:
    """The AR sampling settings a run uses: the ones given, else the checkpoint's generation_config.json (with
    transformers' defaults for what it leaves out), else GLM-Image's published ones."""
    gen = dict(DEFAULTS if generation_config else PUBLISHED)
    gen.update({k: v for k, v in (generation_config or {}).items() if k in DEFAULTS and v is not None})
    gen.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None})
    return gen


def sample_prior_sequences(model, prompt: PriorPrompt, key=None, do_sample: bool = True, temperature=None, top_p=None,
                           top_k=None, callback=None) -> np.ndarray:
    """Run the AR model over ``prompt``: (B, L + n) token sequences (``prior_sequences`` run to its end)."""
    return drain(prior_sequences(model, prompt, key, do_sample, temperature, top_p, top_k), callback)


def prior_sequences(model, prompt: PriorPrompt, key=None, do_sample: bool = True, temperature=None, top_p=None,
                    top_k=None) -> Generator[np.ndarray, None, np.ndarray]:
    """The AR model over ``prompt``, token by token (``generate_step``); returns the (B, L + n) sequences. Sampling
    settings default to the checkpoint's generation_config.json (with transformers' defaults for what it leaves
    out), or to the published ones when it has none."""
    config = getattr(model, "generation_config", None) or {}
    gen = sampling_settings(config, temperature, top_p, top_k)
    tc = model.config.text_config
    inputs = prompt.inputs
    eos = config.get("eos_token_id", tc.eos_token_id)
    # The grid is always complete: no end token before its last token, the end token right after it.
    return (yield from generate_step(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"], inputs["images_per_sample"],
        max_new_tokens=prompt.max_new_tokens, do_sample=do_sample, key=key, eos_token_id=eos,
        pad_token_id=tc.pad_token_id, image_token_ids=prompt.image_ids, min_new_tokens=prompt.max_new_tokens - 1,
        forced_eos_token_id=eos if isinstance(eos, int) else eos[0], **gen))


def prior_token_ids(sequences: np.ndarray, prompt: PriorPrompt) -> mx.array:
    """Each sequence's target grid, upsampled 2x to the DiT's token grid: (B, 4 * h * w) int32."""
    L = prompt.inputs["input_ids"].shape[1]
    th, tw = prompt.grid
    prior = []
    for i, seq in enumerate(sequences):
        ids = extract_large_image_tokens(seq, L, prompt.offset, th * tw)
        if ids.size != th * tw:
            raise RuntimeError(f"sample {i} stopped after {len(seq) - L} tokens, before its {th}x{tw} grid ended")
        prior.append(upsample_token_ids(ids, th, tw))
    return mx.array(np.stack(prior).astype(np.int32))


def generate_prior_tokens(model, processor, prompts, height: int, width: int, images=None, key=None,
                          do_sample: bool = True, temperature: float | None = None, top_p: float | None = None,
                          top_k: int | None = None, callback=None):
    """Prompt(s) -> prior tokens, as diffusers' ``GlmImagePipeline.generate_prior_tokens``.

    Returns ``(prior_token_ids, prior_token_image_ids, source_image_grid_thw)``:
    - prior_token_ids: (B, (H/16)*(W/16)) int32, the generated H/32 x W/32 grid upsampled 2x (nearest);
    - prior_token_image_ids: per sample, the source images' VQ ids upsampled 2x and concatenated (None for t2i);
    - source_image_grid_thw: per sample, (n_images, 3) source grids with h, w doubled (None for t2i).
    """
    prompt = prior_prompt(model, processor, [prompts] if isinstance(prompts, str) else list(prompts), height, width, images)
    sequences = sample_prior_sequences(model, prompt, key, do_sample, temperature, top_p, top_k, callback)
    return prior_token_ids(sequences, prompt), prompt.prior_token_image_ids, prompt.source_image_grid_thw
