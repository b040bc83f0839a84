"""Checks of what a user asks for, one function per setting: each raises ValueError with the one line the user
sees (the CLI prints it, the server answers it as a 400). The name table (request.SETTINGS) says which check a
setting has; nothing here loads a model. ``NonFiniteError`` is what a stage raises when what it made is not finite."""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path

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


def check_guidance_end(value):
    if not (is_number(value) and math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"guidance_end must be a number from 0 to 1 (the share of the steps guided), got {shown(value)}")


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


def is_kind(value, kind) -> bool:
    """Whether a JSON value is of ``kind`` (int, float, str, bool, dict or list; a tuple of them: any): a boolean
    is no number (JSON's true is not 1), an integer is a number. The one type rule of prompt files, metadata
    records and the server's bodies."""
    if isinstance(kind, tuple):
        return any(is_kind(value, k) for k in kind)
    if kind in (int, float):
        return is_int(value) if kind is int else is_number(value)
    return isinstance(value, kind)


KIND_WORDS = {int: "an integer", float: "a number", str: "text", list: "a list"}  # as check_kind says them


def check_kind(name: str, value, kind: type):
    """A JSON value (a prompt file's, a metadata record's) of ``kind``: int, float, str or list; a string is said
    to be one."""
    if not is_kind(value, kind):
        raise ValueError(f"{name} must be {KIND_WORDS[kind]}, got {described(value)}")


def parse_size(size) -> tuple[int | None, int | None]:
    """(width, height) of OpenAI's "WIDTHxHEIGHT", the size of a server body and of a prompt file entry; (None,
    None) for "auto" (or empty): the default, or the first condition image's size. ASCII digits only
    (str.isdigit takes "²", which int() refuses), and few of them (int() refuses thousands); the range and the
    multiple are check_size's."""
    if size in (None, "", "auto"):
        return None, None
    match = re.fullmatch(r"([0-9]{1,6})x([0-9]{1,6})", size) if isinstance(size, str) else None
    if match is None:
        raise ValueError(f"size must be WIDTHxHEIGHT in pixels (multiples of 32) or auto, got {shown(size)}")
    return int(match[1]), int(match[2])


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def read_text(path, flag: str) -> str:
    """The UTF-8 text of the file that ``flag`` (--prompt-file, --config) names; one line when it cannot be read."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{flag} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{flag} {path} is a folder") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path} is not UTF-8 text") from None


def read_json(path, flag: str):
    """The JSON value of the file that ``flag`` names; one line when it cannot be read or parsed."""
    import json

    try:
        return json.loads(read_text(path, flag))
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path} is not JSON: {e.msg} (line {e.lineno})") from None
