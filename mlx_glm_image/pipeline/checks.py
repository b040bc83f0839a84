"""Checks of what a user asks for, one function per setting: each raises ValueError with the one line the user
sees (the CLI prints it, the server answers it as a 400). The name table (request.SETTINGS) says which check a
setting has; nothing here loads a model."""

from __future__ import annotations

import math
import numbers

MAX_STEPS = 1000
SEED_LIMIT = 2**64


def shown(value) -> str:
    """A value as a message shows it: a string quoted, so that "7" is not mistaken for 7."""
    return repr(value) if isinstance(value, str) else str(value)


def check_steps(value):
    if not (is_int(value) and 1 <= value <= MAX_STEPS):
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {shown(value)}")


def check_guidance(value):
    if not (is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"guidance must be a finite number >= 0, got {shown(value)}")


def check_temperature(value):
    if not (is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {shown(value)}")


def check_top_p(value):
    if not (is_number(value) and 0 < value <= 1):
        raise ValueError(f"top-p must be in (0, 1], got {shown(value)}")


def check_top_k(value):
    if not (is_int(value) and value >= 0):
        raise ValueError(f"top-k must be an integer >= 0 (0: off), got {shown(value)}")


def check_previews(value):
    if not (is_int(value) and 0 <= value <= MAX_STEPS):
        raise ValueError(f"previews must be an integer from 0 to {MAX_STEPS}, got {shown(value)}")


def check_seed(value):
    if not (is_int(value) and 0 <= value < SEED_LIMIT):
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {shown(value)}")


def check_side(value):
    """One side alone is an integer (its range and multiple are checked with both sides, by check_size)."""
    if not is_int(value):
        raise ValueError(f"height and width must be integers, got {shown(value)}")


def check_size(height: int, width: int, multiple: int, max_side: int | None = None):
    """Positive multiples of ``multiple``; at most ``max_side`` pixels per side (so max_side**2 in all)."""
    if not (is_int(height) and is_int(width)) or height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple}, got {width}x{height} "
                         "(width x height)")
    if max_side is not None and max(height, width) > max_side:
        raise ValueError(f"height and width must be at most {max_side} pixels each ({max_side * max_side} pixels in "
                         f"all) for this model, got {width}x{height}")


def check_prompt(value):
    """A string, or a list of strings, each valid UTF-8 text."""
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"the prompt must be text, got {type(value).__name__}")
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the prompt is not valid UTF-8 text") from None


def check_type(value, cls, name: str):
    if not isinstance(value, cls):
        raise ValueError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
