"""The OpenAI Images API's request body as this project reads it, without HTTP (server.py serves it; the page at /
sends it): each field of its JSON type, a form's text read as that type, and a body made into the pipeline's
requests, checked before they wait in the queue. Every refusal is an ``ApiError``, OpenAI's error envelope.

The fields are the name table's (pipeline/request.py: each setting's ``body`` name) and ``FIELDS``, the ones only
the API has: adding a setting is a row of the name table, and the body takes it.
"""

from __future__ import annotations

import json
import random
import re

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MAX_IMAGES = 10  # per request, as OpenAI's API allows
MAX_PARTIAL_IMAGES = 3  # as OpenAI's API allows
# a server's longest prompt by default, as the AR model reads it before it writes (the text after the chat template,
# each condition image's tokens, the grid sizes; prompt_tokens): a long prompt of 2,048 tokens (the glyph
# encoder's max_sequence_length) and three condition images at the AR image processor's largest (2048x2048 pixels,
# read at half: 64x64 = 4,096 tokens each) take 14,336. One eighth of the released model's 131,072 positions: the
# prefill's cost grows with the square of the length, and one generation runs at a time.
MAX_PROMPT_TOKENS = 16384
# the body's fields by the JSON type they take, besides the name table's; a form's text is read as that type. The
# OpenAI fields GLM-Image has no use for are accepted, and checked all the same.
FIELDS = {"n": int, "size": str, "response_format": str, "output_format": str, "stream": bool,
          "progress": bool,  # not OpenAI's: the page asks for progress events in the stream
          "model": str, "quality": str, "background": str, "moderation": str, "style": str, "user": str,
          "input_fidelity": str, "output_compression": int}
CONFIG = (bool, dict)  # the step cache's fields take true, false or an object
# each JSON type as OpenAI's messages name it
KINDS = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", dict: "an object",
         list: "an array", CONFIG: "true, false or an object"}


class ApiError(Exception):
    """An error answered in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {429: "rate_limit_exceeded"}  # else the client's fault (4xx) or the server's (5xx)

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind,
                          "param": self.param, "code": self.code}}


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """(height, width) of OpenAI's "WIDTHxHEIGHT", or (None, None) for "auto" (checks.parse_size); a 400 naming
    the field otherwise."""
    from .pipeline.checks import parse_size as width_height

    try:
        width, height = width_height(size)
    except ValueError as e:
        raise ApiError(400, str(e), "size") from None
    return height, width


def field_types() -> dict:
    """Each body field the server knows, by its JSON type: FIELDS and the name table's."""
    from .pipeline.request import CONFIGS, SETTINGS

    return {**FIELDS, **{s.body: CONFIG if s.type in CONFIGS else s.type for s in SETTINGS if s.body}}


def typed(body: dict) -> dict:
    """The body with each known field checked against its JSON type (checks.is_kind; a 400 names the first that
    is not), nulls left out (OpenAI's API reads null as not given), and a number for a float setting as a float:
    JSON has one number type, and MLX takes no integer past int64 (a guidance of 2**63 would fail in the
    generation)."""
    from .pipeline.checks import is_kind

    types, out = field_types(), {}
    for name, value in body.items():
        kind = types.get(name)
        if value is None:
            continue
        if kind is not None and not is_kind(value, kind):
            got = KINDS.get(type(value), type(value).__name__)
            raise ApiError(400, f"Invalid type for '{name}': expected {KINDS[kind]}, but got {got} instead", name,
                           "invalid_type")
        out[name] = _float(value, name) if kind is float else value
    return out


def _float(value, name: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer of more than 308 digits
        raise ApiError(400, f"{name} must be a finite number, got an integer of {len(str(value))} digits", name) from None


def form_body(fields: dict) -> dict:
    """A form's fields (all text) as JSON would carry them: each known field's text read as its type."""
    types = field_types()
    return {name: _from_text(text, types[name], name) if name in types else text for name, text in fields.items()}


def _from_text(text: str, kind, name: str):
    """One form field's text as ``kind``; a 400 naming the field otherwise."""
    try:
        if kind is int and re.fullmatch(r"-?[0-9]+", text):  # int() would also take " 1", "1_0" and "١"
            return int(text)
        if kind is float:
            return float(text)
        if kind is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind is CONFIG:
            return json.loads(text)
        if kind is str:
            return text
    except (ValueError, RecursionError):
        pass
    raise ApiError(400, f"{name} must be {KINDS[kind]}, got {text!r}", name)


def image_requests(pipe, body: dict, images=None, defaults: dict | None = None,
                   max_prompt_tokens: int | None = None) -> tuple[list, str]:
    """The pipeline requests for one API request (``n`` of them, seeds seed, seed + 1, ...), checked now, before
    it waits in the queue. Body fields are the name table's (pipeline/request.py) and FIELDS, each of its JSON
    type (a form's, read by form_body). ``defaults``: the server's own (its step cache), for the settings the
    body leaves out; ``max_prompt_tokens``: the server's longest prompt (prompt_tokens), None for no limit."""
    from .pipeline.request import SETTINGS
    from .pipeline.step_cache import SGLANG

    body = typed(body)
    prompt, n, fmt = body.get("prompt"), body.get("n", 1), body.get("output_format", "png")
    if not prompt:
        raise ApiError(400, "prompt is required (a non-empty string)", "prompt")
    if not 1 <= n <= MAX_IMAGES:
        raise ApiError(400, f"n must be from 1 to {MAX_IMAGES}, got {n}", "n")
    if body.get("response_format") not in (None, "b64_json"):
        raise ApiError(400, f"response_format {body['response_format']!r} is not served: this server returns b64_json "
                            "only", "response_format")
    if fmt not in OUTPUT_FORMATS:
        raise ApiError(400, f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}", "output_format")
    if not 0 <= body.get("partial_images", 0) <= MAX_PARTIAL_IMAGES:  # OpenAI's field and range, before the setting's
        raise ApiError(400, f"partial_images must be from 0 to {MAX_PARTIAL_IMAGES}, got {body['partial_images']}",
                       "partial_images")
    height, width = parse_size(body.get("size"))
    call = dict(prompt=prompt, image=images, height=height, width=width)
    for s in SETTINGS:
        if s.body and s.name != "prompt" and s.body in body:
            try:
                call[s.name] = s.from_body(body[s.body])
                if s.check is not None and call[s.name] is not None:
                    s.check(call[s.name])
            except ValueError as e:
                raise ApiError(400, str(e), s.body) from None
    if not body.get("stream"):
        call.pop("previews", None)  # partial images are streamed; without a stream there is nothing to send them in
    if "cache" not in body:
        call.update({k: v for k, v in (defaults or {}).items() if k not in call})
    elif body["cache"] is True:  # the preset, as --cache: its calibrator too, unless the body gives one
        call.update(SGLANG.settings(**{k: call[k] for k in ("calibrator_config",) if k in call}))
    seed = call.pop("seed", None)
    seed = random.randrange(2**31) if seed is None else seed
    try:
        first = pipe.request(**call, seed=seed)
        if max_prompt_tokens is not None:
            check_prompt_tokens(prompt_tokens(pipe, first), max_prompt_tokens)
        return [first] + [pipe.request(**call, seed=seed + i) for i in range(1, n)], fmt
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def prompt_tokens(pipe, request) -> int | None:
    """The tokens the AR model reads for ``request``'s prompt before it writes: its text after the chat template,
    each condition image's tokens and the grid sizes (the processor's count, without preprocessing any image);
    None without an AR processor (the prior stage says so)."""
    from .pipeline.image_processor import image_size
    from .pipeline.processor import target_grids

    processor = pipe.components.facts.processor
    if processor is None:
        return None
    sizes = [image_size(im) for im in request.image[0]] if request.image else []
    written = target_grids(request.height, request.width, not sizes).new_tokens
    return processor.sequence_length(request.prompt[0], request.height, request.width, sizes) - written


def check_prompt_tokens(count: int | None, limit: int):
    if count is not None and count > limit:
        raise ApiError(400, f"the prompt is {count} tokens as the AR model reads it (its text, its condition images' "
                            f"tokens, the grid sizes); this server takes at most {limit} (--max-prompt-tokens)",
                       "prompt", "prompt_too_long")
