"""A bounded fuzz of the server (a subprocess on 127.0.0.1, tiny checkpoint): seeded random, type-confused and
malformed requests to both image endpoints and a few odd paths and methods. Every request gets an HTTP answer,
none a 5xx, every error is OpenAI's envelope; at the end the server is alive, generates, and logged no traceback.
The bodies that happen to be valid are 64x64 with a few steps, so the run stays well under a minute."""

import json
import math
import random
import time

import pytest
from test_server import FAST, Server, decode, envelope, multipart, png_bytes

pytest.importorskip("fastapi")

SEED, CASES, LIMIT_S = 2026, 300, 90
BASE = {"prompt": "a red cat", "size": "64x64", **FAST}
FIELDS = ["prompt", "n", "size", "quality", "response_format", "output_format", "output_compression", "stream",
          "partial_images", "progress", "seed", "num_inference_steps", "guidance_scale", "temperature", "top_p",
          "top_k", "cache", "calibrator", "user", "background", "moderation", "model", "style", "input_fidelity",
          "no_such_field", ""]
VALUES = [None, True, False, 0, 1, 2, 3, -1, 7, 2**63, 2**64, 10**30, -10**30, 0.5, 1.5, -0.0, math.nan, math.inf,
          -math.inf, "", " ", "x", "1", "2", "-1", "1.5", "1e400", "nan", "true", "false", "null", "auto", "64x64",
          "96x64", "100x64", "0x0", "64x", "x64", "64X64", "-64x64", "png", "jpeg", "webp", "gif", "b64_json", "url",
          "\u0661", "\u00b2x64", "\u096c\u096ax\u096c\u096a", "\U0001f63a" * 50, "\x00", "\ud800", "a" * 5000, "{}",
          '{"Fn_compute_blocks": 1, "Bn_compute_blocks": 0}', "[1]", "{", [], [1], ["png"], [None], [[[]]], {},
          {"a": 1}, {"Fn_compute_blocks": "x"}, {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0},
          {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": []}, {"taylorseer_order": 9},
          {"taylorseer_order": -1}, {"a": {"b": [None]}}]
RAW_BODIES = [b"", b"{", b"}", b"[]", b"null", b"true", b"7", b'"x"', b"NaN", b"Infinity", b"[" * 100_000,
              b'{"prompt": ' + b"[" * 50_000, b"\xff\xfe\x00", b"\xef\xbb\xbf{}", b'{"prompt": "x", "prompt": 1}',
              b'{"prompt": "x", "size": "64x64", "guidance_scale": NaN}', b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}",
              b'{"prompt": "' + b"a" * 1_100_000 + b'"}', b"prompt=x&size=64x64"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", None,
                 "application/x-www-form-urlencoded", "multipart/form-data", "multipart/form-data; boundary=nope"]
ODD = [("GET", "/v1/images/generations"), ("PUT", "/v1/images/edits"), ("DELETE", "/v1/models"), ("GET", "/v1/nope"),
       ("POST", "/health"), ("HEAD", "/health"), ("OPTIONS", "/v1/images/generations"), ("GET", "/%ff%00"),
       ("GET", "/" + "a" * 4000), ("POST", "/v1/images/variations"), ("GET", "/v1/models/../../health")]


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--memory", "resident")
    yield s
    s.stop()


def mutated(rng: random.Random, body: dict) -> dict:
    """``body`` with one to three fields set to random values (or left out), or a random object altogether."""
    body = dict(body) if rng.random() < 0.85 else {}
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.1:
            body.pop(field, None)
        else:
            body[field] = rng.choice(VALUES)
    return body


def generation(rng: random.Random) -> tuple:
    if rng.random() < 0.2:
        body = rng.choice(RAW_BODIES)
    else:
        body = json.dumps(mutated(rng, BASE)).encode()  # NaN and Infinity as their JSON literals
    kind = "application/json" if rng.random() < 0.75 else rng.choice(CONTENT_TYPES)
    return "POST", "/v1/images/generations", body, {"Content-Type": kind} if kind else {}


def edit(rng: random.Random) -> tuple:
    if rng.random() < 0.1:
        return "POST", "/v1/images/edits", rng.choice(RAW_BODIES), {"Content-Type": rng.choice(CONTENT_TYPES[4:])}
    fields = {k: v if isinstance(v, str) else json.dumps(v) if not isinstance(v, bool) else str(v).lower()
              for k, v in mutated(rng, BASE).items() if v is not None and "\ud800" not in str(v)}
    files = rng.choice([[("image", "a.png", png_bytes())], [("image[]", "a.png", png_bytes()), ("image[]", "b.png", png_bytes((96, 64)))],
                        [("image", "junk.png", b"not an image")], [("image", "empty.png", b"")], [("mask", "m.png", png_bytes())],
                        [], [("image", "\u00e9\U0001f63a" * 40 + ".png", png_bytes())], [("image", "a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)]])
    body, kind = multipart(fields, files)
    return "POST", "/v1/images/edits", body, {"Content-Type": kind}


def check(method: str, status: int, headers: dict, data: bytes):
    assert status < 500, data[:300]
    if status >= 400 and method != "HEAD":
        envelope(data)
    elif status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
        assert b"server_error" not in data and b".completed" in data, data[-300:]


def test_fuzz_requests_get_4xx_envelopes_and_the_server_lives(server):
    rng, statuses, t0 = random.Random(SEED), {}, time.time()
    for i in range(CASES):
        assert time.time() - t0 < LIMIT_S, f"the fuzz ran out of time after {i} of {CASES} requests"
        roll = rng.random()
        method, path, body, headers = (generation(rng) if roll < 0.65 else edit(rng) if roll < 0.95 else
                                       (*rng.choice(ODD), b"", {}))
        try:
            status, answer_headers, data = server.raw(method, path, body, headers, timeout=30)
            check(method, status, answer_headers, data)
        except Exception as e:  # noqa: BLE001 - the failure names the request that caused it
            raise AssertionError(f"request {i}: {method} {path[:100]} {headers} {body[:300]!r}: {e!r}") from e
        statuses[status] = statuses.get(status, 0) + 1
    print(f"{CASES} fuzz requests in {time.time() - t0:.1f} s: {dict(sorted(statuses.items()))}")
    assert server.proc.poll() is None, "the server is alive"
    out = server.client().images.generate(prompt="a cat", size="64x64", extra_body=FAST)
    assert decode(out.data[0]).shape == (64, 64, 3)
    assert "Traceback" not in server.log(), server.log()[-3000:]
