"""Checks of what a user asks for, shared by the Python API, the CLI and any other front end: one message each,
before any model runs."""

from __future__ import annotations

import math
import numbers

MAX_STEPS = 1000
SEED_LIMIT = 2**64


def check_sampling(num_inference_steps=None, guidance_scale=None, temperature=None, top_p=None, top_k=None):
    """Denoising steps 1..1000, guidance finite >= 0, temperature finite > 0, top-p in (0, 1], top-k >= 0."""
    if num_inference_steps is not None and not (_is_int(num_inference_steps) and 1 <= num_inference_steps <= MAX_STEPS):
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {num_inference_steps}")
    if guidance_scale is not None and not (_is_number(guidance_scale) and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance_scale}")
    if temperature is not None and not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top-p must be in (0, 1], got {top_p}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 0):
        raise ValueError(f"top-k must be an integer >= 0 (0: off), got {top_k}")


def check_seed(seed):
    if seed is not None and not (_is_int(seed) and 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed}")


def check_size(height: int, width: int, multiple: int, max_side: int | None = None):
    """Positive multiples of ``multiple``; at most ``max_side`` pixels per side (so max_side**2 in all)."""
    if not (_is_int(height) and _is_int(width)) or height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
    if max_side is not None and max(height, width) > max_side:
        raise ValueError(f"height and width must be at most {max_side} pixels each ({max_side * max_side} pixels in "
                         f"all) for this model, got {height}x{width}")


def check_prompt(prompt):
    for p in [prompt] if isinstance(prompt, str) else prompt or []:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the prompt is not valid UTF-8 text") from None


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
