"""GLM-Image's prior stage around the decode loop: the AR model's prompt for an image (the chat template, the grids
it names, the condition images' VQ tokens), the rule that the grid is always written whole, and the target grid read
out of the sequences and upsampled 2x to the DiT's token grid. ``generate_prior_tokens`` has the return value of
diffusers' ``GlmImagePipeline.generate_prior_tokens``.

The decode loop and the samplers are generic (prior_tokens.py, sample_utils.py); the grids' sizes are the
processor's one rule (processor.target_grids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import mlx.core as mx
import numpy as np

from .processor import TargetGrids, target_grids
from .prior_tokens import Progress, drain, generate_step
from .sample_utils import Sampler


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


def upsample_token_ids(token_ids, h: int, w: int) -> np.ndarray:
    """(h*w,) ids -> (4*h*w,) ids of the 2x nearest-upsampled grid."""
    g = np.asarray(token_ids).reshape(h, w)
    return np.repeat(np.repeat(g, 2, axis=0), 2, axis=1).reshape(-1)


@dataclass
class PriorPrompt:
    """The AR model's input for a batch of prompts, and the grids it writes."""

    inputs: dict  # the processor's arrays (input_ids, attention_mask, image_grid_thw, images_per_sample, ...)
    grids: TargetGrids
    image_ids: np.ndarray | None = None  # the source images' VQ ids, in placeholder order
    prior_token_image_ids: list | None = None  # per sample, upsampled 2x (diffusers' return value)
    source_image_grid_thw: list | None = None  # per sample, h and w doubled

    @property
    def max_new_tokens(self) -> int:
        return self.grids.new_tokens


def prior_prompt(model, processor, prompts: list[str], height: int, width: int, images=None) -> PriorPrompt:
    """Chat template + tokens (+ the condition images' VQ tokens) for an ``height`` x ``width`` image."""
    return drain(prior_prompt_steps(model, processor, prompts, height, width, images))


def prior_prompt_steps(model, processor, prompts: list[str], height: int, width: int,
                       images=None) -> Generator[Progress, None, PriorPrompt]:
    """``prior_prompt``, yielding a ``Progress`` after each condition image the vision encoder reads, so that its
    consumer can stop there (by closing it); returns the prompt."""
    images = normalize_images(images, len(prompts))
    t2i = images is None
    conversations = [
        [{"role": "user", "content": ([] if t2i else [{"type": "image", "image": im} for im in images[i]])
          + [{"type": "text", "text": p}]}]
        for i, p in enumerate(prompts)
    ]
    inputs = processor.apply_chat_template(conversations, target_h=height, target_w=width, padding=len(prompts) > 1)
    prompt = PriorPrompt(inputs, target_grids(height, width, t2i))
    if not t2i:
        yield from _add_source_images(model, prompt, len(images[0]))
    return prompt


def _add_source_images(model, prompt: PriorPrompt, n_src: int) -> Generator[Progress, None, None]:
    inputs = prompt.inputs
    src = model.source_grids(inputs["image_grid_thw"], inputs["images_per_sample"])
    bounds = np.cumsum([0] + [int(np.prod(g)) for g in src])
    pixels = mx.array(inputs["pixel_values"])
    image_ids = []
    for i, grid in enumerate(src):  # one image at a time (the vision encoder reads each alone anyway)
        features = model.get_image_features(pixels[int(bounds[i]):int(bounds[i + 1])], grid[None])
        image_ids.append(np.array(model.get_image_tokens(features)))
        yield Progress("condition", i, len(src))
    image_ids = np.concatenate(image_ids)
    up = [upsample_token_ids(image_ids[bounds[i]:bounds[i + 1]], int(g[1]), int(g[2])) for i, g in enumerate(src)]
    up_grids = src.copy()
    up_grids[:, 1:] *= 2
    batch = len(inputs["input_ids"])
    prompt.image_ids = image_ids
    prompt.prior_token_image_ids = [mx.array(np.concatenate(up[i * n_src:(i + 1) * n_src]).astype(np.int32))
                                    for i in range(batch)]
    prompt.source_image_grid_thw = [mx.array(up_grids[i * n_src:(i + 1) * n_src].astype(np.int32)) for i in range(batch)]


def whole_grid(new_tokens: int, eos: list[int], vocab_size: int) -> tuple:
    """The logits processors that write the grid whole: no end token before its last token, the first end token
    right after it (transformers' ``min_new_tokens`` and ``forced_eos_token_id``)."""
    is_eos = mx.array(np.isin(np.arange(vocab_size), eos))

    def no_early_end(n, logits):
        return mx.where(is_eos & (n < new_tokens - 1), -mx.inf, logits)

    def end_after_grid(n, logits):
        forced = mx.where(mx.arange(logits.shape[-1]) == eos[0], 0.0, -mx.inf)
        return mx.where(n == new_tokens - 1, forced, logits)

    return no_early_end, end_after_grid


def end_tokens(model) -> list[int]:
    """The AR model's end tokens (its generation config's, else its text config's); the first ends every grid."""
    eos = (getattr(model, "generation_config", None) or {}).get("eos_token_id", model.config.text_config.eos_token_id)
    return [eos] if isinstance(eos, int) else list(eos)


def prior_sequences(model, prompt: PriorPrompt, sampler: Sampler,
                    key=None) -> Generator[Progress | np.ndarray, None, np.ndarray]:
    """The AR model over ``prompt``, chunk by chunk of the prefill, then token by token (``generate_step``);
    returns the (B, L + n) sequences, each with its grids written whole."""
    tc = model.config.text_config
    eos = end_tokens(model)
    n = prompt.max_new_tokens
    return (yield from generate_step(
        model, {**prompt.inputs, "image_token_ids": prompt.image_ids}, max_new_tokens=n, sampler=sampler, key=key,
        logits_processors=whole_grid(n, eos, tc.vision_vocab_size), eos_token_id=eos, pad_token_id=tc.pad_token_id))


def prior_token_ids(sequences: np.ndarray, prompt: PriorPrompt) -> mx.array:
    """Each sequence's target grid, upsampled 2x to the DiT's token grid: (B, 4 * h * w) int32."""
    L = prompt.inputs["input_ids"].shape[1]
    th, tw = prompt.grids.target
    start = L + prompt.grids.offset
    prior = []
    for i, seq in enumerate(sequences):
        ids = np.asarray(seq)[start:start + th * tw]
        if ids.size != th * tw:
            raise RuntimeError(f"sample {i} stopped after {len(seq) - L} tokens, before its {th}x{tw} grid ended")
        prior.append(upsample_token_ids(ids, th, tw))
    return mx.array(np.stack(prior).astype(np.int32))


def generate_prior_tokens(model, processor, prompts, height: int, width: int, images=None, *, sampler: Sampler,
                          key=None):
    """Prompt(s) -> prior tokens, as diffusers' ``GlmImagePipeline.generate_prior_tokens``.

    Returns ``(prior_token_ids, prior_token_image_ids, source_image_grid_thw)``:
    - prior_token_ids: (B, (H/16)*(W/16)) int32, the generated H/32 x W/32 grid upsampled 2x (nearest);
    - prior_token_image_ids: per sample, the source images' VQ ids upsampled 2x and concatenated (None for t2i);
    - source_image_grid_thw: per sample, (n_images, 3) source grids with h, w doubled (None for t2i).
    """
    prompt = prior_prompt(model, processor, [prompts] if isinstance(prompts, str) else list(prompts), height, width, images)
    sequences = drain(prior_sequences(model, prompt, sampler, key))
    return prior_token_ids(sequences, prompt), prompt.prior_token_image_ids, prompt.source_image_grid_thw
