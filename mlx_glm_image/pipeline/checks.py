"""Checks of what a user asks for, one function per setting: each raises ValueError with the one line the user
sees (the CLI prints it, the server answers it as a 400). The name table (request.SETTINGS) says which check a
setting has; nothing here loads a model. ``NonFiniteError`` is what a stage raises when what it made is not finite."""

from __future__ import annotations

import math
import numbers

MAX_STEPS = 1000
MAX_GUIDANCE = 100  # past it the guided velocity overflows in bf16 long before it means anything
SEED_LIMIT = 2**64


def shown(value) -> str:
    """A value as a message shows it: a string quoted, so that "7" is not mistaken for 7."""
    return repr(value) if isinstance(value, str) else str(value)


class NonFiniteError(RuntimeError):
    """A stage produced NaN or infinite values (corrupt weights, an extreme guidance)."""


def described(value) -> str:
    """What a value of the wrong type is, for a message: a string is named as one, so that "7" is not taken for 7."""
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return shown(value)


def check_steps(value):
    if not (is_int(value) and 1 <= value <= MAX_STEPS):
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {shown(value)}")


def check_guidance(value):
    if not (is_number(value) and math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
        raise ValueError(f"guidance must be a number from 0 to {MAX_GUIDANCE}, got {shown(value)}")


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


def check_sequence_length(length: int, limit: int):
    """The AR model reads the prompt and writes the image's grid in one sequence of at most ``limit`` tokens (its
    max_position_embeddings): a longer one has no positions to run on."""
    if length > limit:
        raise ValueError(f"the prompt is too long: with the image's grid it is {length} tokens, and this model reads "
                         f"at most {limit}")


def check_glyph_length(length: int, limit: int):
    """The glyph tokens of a prompt's quoted texts, all of them, are at most ``limit`` (max_sequence_length, which
    diffusers applies to each string alone): the DiT attends over them and the image's tokens together."""
    if length > limit:
        raise ValueError(f"the prompt's quoted text is too long: {length} glyph tokens in all, at most {limit} "
                         "(max_sequence_length)")


def check_type(value, cls, name: str):
    if not isinstance(value, cls):
        raise ValueError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


def check_kind(name: str, value, kind: type):
    """A JSON value (a prompt file's, a metadata record's) of ``kind``: int, float, str or list; a bool is no
    number, and a string is said to be one."""
    is_kind, said = {int: (is_int, "an integer"), float: (is_number, "a number"), str: (_is_str, "text"),
                     list: (_is_list, "a list")}[kind]
    if not is_kind(value):
        raise ValueError(f"{name} must be {said}, got {described(value)}")


def _is_str(x) -> bool:
    return isinstance(x, str)


def _is_list(x) -> bool:
    return isinstance(x, list)


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
