"""A local image server with the OpenAI Images API, backed by one resident GlmImagePipeline.

    python -m mlx_glm_image.server -m glm-image-4bit            # http://127.0.0.1:8000/v1
    python -m mlx_glm_image.server -m glm-image-4bit --host 0.0.0.0 --api-key SECRET

POST /v1/images/generations (JSON) and /v1/images/edits (multipart), GET /v1/models and /health. GLM-Image's
own settings go in the body: seed, num_inference_steps, guidance_scale, temperature, top_p, top_k, and the step
cache (cache: true, false or cache-dit's DBCacheConfig fields; calibrator: {"taylorseer_order": k}); each image's
seed comes back in its `seed` field (and `revised_prompt` is the prompt used), so a client can reproduce it.
One generation runs on the device at a time, first come first served; at most --max-queue requests are waiting
or running (the one running counts), and a prompt is at most --max-prompt-tokens as the AR model reads it (its
text, its condition images' tokens). A JSON body is at most 1 MB; each field must have its JSON type (a form's
text must read as it: images_api.py reads the body); every error comes in OpenAI's error envelope, and what is
still running --grace seconds after SIGINT or SIGTERM gets a 503. This module is the HTTP app: the worker, the
endpoints, the stream, the command.
Needs the server extra: pip install "mlx-glm-image[server]".
"""


import asyncio
import base64
import concurrent.futures
import hmac
import io
import ipaddress
import json
import queue
import socket
import sys
import threading
import time
from pathlib import Path

from .cli import (Parser, add_cache_arguments, add_model_arguments, cache_settings, fail, load_adapters, lora_entries,
                  prog_name)
from .images_api import MAX_IMAGES, MAX_PROMPT_TOKENS, OUTPUT_FORMATS, ApiError, form_body, image_requests

# a JSON body is a prompt and settings: far less than this, even with a prompt as long as the AR model reads; the
# bound is checked before the body is parsed, so that a huge one costs neither the parse nor the tokenizer
MAX_JSON_BYTES = 1 << 20
SHUTDOWN_MARGIN = 2.0  # seconds past --grace for the answers of the requests still in progress to go out
PAGE = Path(__file__).parent / "web" / "index.html"  # the page at /: one file, no build step, nothing fetched
PROGRESS = ("stage", "condition", "prefill", "token", "step")  # the events a stream's progress events tell
# the pipeline's events (pipeline/events.py) by what the log calls them
PARTS = {"condition": "condition image", "prefill": "prefill chunk", "token": "token", "step": "step",
         "preview": "preview", "image": "image"}


class Worker:
    """Runs generations one at a time on a daemon thread (so that a shutdown never waits on the device past its
    grace period); at most ``max_queue`` requests are waiting or running (``admit``). A generation is the
    pipeline's event stream, consumed here: one whose client went away is closed at its next event (a condition
    image, a prefill chunk, a token or a step), and the next starts."""

    def __init__(self, pipe, max_queue: int):
        self.pipe, self.max_queue, self.pending = pipe, max_queue, 0
        self.deadline, self.grace = None, None  # set by stop()
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="generation").start()

    def _loop(self):
        while True:
            future, cancelled, requests, on_event = self.jobs.get()
            if cancelled.is_set() or not future.set_running_or_notify_cancel():
                continue  # its client went away while it waited: the slot is free, no work is done
            try:
                future.set_result(self._generate(requests, cancelled, on_event))
            except BaseException as e:  # noqa: BLE001 - handed to the request that asked
                future.set_exception(e)

    def _generate(self, requests: list, cancelled: threading.Event, on_event) -> list | None:
        """The image event of each of ``requests`` (one image each), or None when the client left first (said in
        the log, with where it stopped); every event goes to ``on_event`` (on this thread) as it comes."""
        images = [None] * len(requests)
        events = self.pipe.stream_batch(requests)
        try:
            for event in events:
                if cancelled.is_set():
                    print(f"stopped a generation whose request ended (its client left, or the server is shutting "
                          f"down) after {done_part(event)}", file=sys.stderr, flush=True)
                    return None
                if on_event is not None:
                    on_event(event)
                if event.kind == "image":
                    images[event.request] = event
        finally:
            events.close()  # a cancelled run stops here and frees what it loaded
        return images

    def stop(self, grace: float):
        """The server is shutting down: each request still waiting or running after ``grace`` seconds is answered
        (a 503 in the envelope) and its generation stopped. Called from a signal handler: it only sets values."""
        self.deadline, self.grace = time.monotonic() + grace, grace

    def admit(self) -> "Slot":
        """A place in the queue for one request, or a 429 when ``max_queue`` requests hold one: asked before a
        stream's first byte, so that a full queue is a 429 there too (which clients retry), not an error event."""
        if self.pending >= self.max_queue:
            raise ApiError(429, f"the server is busy: {self.pending} requests are waiting or running (--max-queue "
                                f"{self.max_queue}); retry later", code="queue_full")
        return Slot(self)

    async def run(self, slot: "Slot", request, requests: list, on_event=None) -> list:
        """The image events of ``requests``, generated in turn in the place ``slot`` holds (released at the end);
        ``on_event(event)`` is called from the worker's thread. A client that disconnects, a caller that is
        cancelled, or the end of a shutdown's grace period stops the generation."""
        cancelled, future = threading.Event(), concurrent.futures.Future()
        self.jobs.put((future, cancelled, requests, on_event))
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=0.25)
                if done:
                    return waiting.result()
                if await request.is_disconnected():
                    raise ApiError(499, "the client disconnected")
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise ApiError(503, f"the server shut down before this request finished (--grace {self.grace:g} "
                                        "s)", code="shutting_down")
        finally:
            if not future.done():
                cancelled.set()
                waiting.cancel()  # its result, or failure, comes to no one now
            slot.release()


class Slot:
    """One of a worker's ``max_queue`` places, held from admission to the end of its request; released once, by
    whichever ends first (the generation, or the response that streams it)."""

    def __init__(self, worker: Worker):
        self.worker = worker
        worker.pending += 1

    def release(self):
        if self.worker is not None:
            self.worker.pending -= 1
            self.worker = None


def done_part(event) -> str:
    """What a run has done by ``event``, in the log's words."""
    if event.kind == "stage":
        return f"the {event.stage} stage" if event.done else f"the start of the {event.stage} stage"
    return f"{PARTS[event.kind]} {event.index + 1} of {event.total}"


def encode_image(image, fmt: str, record: dict | None = None) -> str:
    """Base64 of the image in ``fmt``; a PNG carries its metadata ``record`` as the CLI's do (metadata.py)."""
    from . import metadata

    buffer = io.BytesIO()
    info = metadata.png_info(record) if fmt == "png" and record is not None else None
    image.save(buffer, format=OUTPUT_FORMATS[fmt], **({"pnginfo": info} if info is not None else {}))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def images_response(images: list, requests, fmt: str) -> dict:
    """OpenAI's images response from the image events of ``requests``."""
    first = images[0].image
    return {"created": int(time.time()), "output_format": fmt, "size": f"{first.width}x{first.height}",
            "data": [{"b64_json": encode_image(e.image, fmt, e.metadata), "revised_prompt": request.prompt[0],
                      "seed": request.seed} for e, request in zip(images, requests)]}


def sse(kind: str, data: dict) -> str:
    """One Server-Sent Event: its type, and its data as one JSON line."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


async def stream_events(worker: Worker, slot: Slot, request, requests: list, fmt: str, prefix: str, progress: bool):
    """The generation as OpenAI's image stream: per image, ``{prefix}.partial_image`` for each preview, then
    ``{prefix}.completed``; an ``error`` event if it fails. Each event of an image carries its ``image_index``
    (not OpenAI's for partial images, which has one image a stream). With ``progress`` (not OpenAI's; the page asks
    for it), ``{prefix}.progress`` events tell the stage and the counts of condition images, prefill chunks,
    tokens and steps."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = asyncio.ensure_future(worker.run(slot, request, requests,
                                           on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e)))
    # the end, after the events: the worker hands each over before its result, and the loop keeps their order
    job.add_done_callback(lambda _: events.put_nowait(None))
    common = {"quality": "auto", "background": "auto", "output_format": fmt}
    tokens = [0] * len(requests)
    try:
        while (e := await events.get()) is not None:
            r = requests[e.request]
            size = {"size": f"{r.width}x{r.height}", "created_at": int(time.time()), **common}
            if e.kind == "token":
                tokens[e.request] += e.count
            if e.kind == "preview":
                yield sse(f"{prefix}.partial_image", {"b64_json": encode_image(e.image, fmt), "partial_image_index": e.index,
                                                      "image_index": e.request, **size})
            elif e.kind == "image":
                usage = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                         "output_tokens": tokens[e.request], "total_tokens": tokens[e.request]}
                yield sse(f"{prefix}.completed", {"b64_json": encode_image(e.image, fmt, e.metadata), "usage": usage,
                                                  "seed": r.seed, "image_index": e.request, **size})
            elif progress and e.kind in PROGRESS and not e.done:
                yield sse(f"{prefix}.progress", {"stage": e.stage, "event": e.kind, "index": e.index, "total": e.total,
                                                 "image_index": e.request})
        job.result()
    except ApiError as error:
        yield sse("error", error.body())
    except (ValueError, RuntimeError) as error:  # checks the pipeline makes late, non-finite outputs
        yield sse("error", ApiError(400 if isinstance(error, ValueError) else 500, " ".join(str(error).split())).body())
    finally:
        job.cancel()  # the client left (nothing if the job ended): the worker stops at the run's next event
        if job.done() and not job.cancelled():
            job.exception()  # a failure after the client left is no one's to hear: taken, not logged as lost


async def read_json(request, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object of a request body, refused with a 413 past ``max_bytes``: by its Content-Length before a
    byte is read, else counted as it comes (a chunked body has no length)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > max_bytes:
            raise _too_large(max_bytes)
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise ApiError(400, f"the body must be JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"a JSON body is at most {max_bytes >> 20} MB: this one is larger", code="body_too_large")


async def read_uploads(request, max_bytes: int) -> tuple[dict, list]:
    """A multipart edit request: its fields and its images (PIL, RGB), every upload checked."""
    from .pipeline.image_processor import load_image

    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes * (MAX_IMAGES + 1):
        raise ApiError(413, f"the request is {int(length) >> 20} MB; uploads are limited to {max_bytes >> 20} MB an image")
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and not isinstance(v, str)]
    if not uploads:
        raise ApiError(400, "an edit needs at least one image file (field image or image[])", "image")
    images = []
    for upload in uploads:
        data = await upload.read()
        if len(data) > max_bytes:
            raise ApiError(413, f"{upload.filename} is {len(data) >> 20} MB; uploads are limited to {max_bytes >> 20} MB", "image")
        try:
            images.append(load_image(io.BytesIO(data), name=upload.filename or "upload"))
        except ValueError as e:
            raise ApiError(400, str(e), "image") from None
    return form_body(fields), images


def create_app(pipe, model_name: str, api_key: str | None = None, max_queue: int = 8, max_upload_mb: int = 20,
               defaults: dict | None = None, max_prompt_tokens: int | None = MAX_PROMPT_TOKENS):
    """The FastAPI application around ``pipe`` (kept resident); ``defaults``: call arguments for what a request
    leaves out (the server's step cache); ``max_prompt_tokens``: the longest prompt as the AR model reads it."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="mlx-glm-image", version=_version())
    worker = app.state.worker = Worker(pipe, max_queue)  # main() stops it at shutdown

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        # the framework's own answers (no such path or method, a broken multipart body) in the same envelope
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code,
                            headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return JSONResponse(ApiError(500, f"the generation failed: {error}").body(), status_code=500)

    async def authenticate(request: Request):
        # a dependency, not an HTTP middleware: those hide a client's disconnect from the endpoint
        given = request.headers.get("authorization", "")
        if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    v1 = dict(dependencies=[Depends(authenticate)])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued": worker.pending}

    @app.get("/v1/models", **v1)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "mlx-glm-image",
                                            "lora": [{k: r[k] for k in ("name", "scale", "model", "source")}
                                                     for r in pipe.components.adapters.records()]}]}

    class Stream(StreamingResponse):
        """An event stream that gives its queue place back however it ends, also when its events never started
        (a client gone before the first), and closes its events then (which stops their generation)."""

        def __init__(self, events, slot: Slot):
            super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.slot = slot

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.slot.release()
                await self.body_iterator.aclose()

    async def answer(request, body: dict, images, prefix: str):
        requests, fmt = image_requests(pipe, body, images, defaults=defaults, max_prompt_tokens=max_prompt_tokens)
        slot = worker.admit()
        if body.get("stream"):
            return Stream(stream_events(worker, slot, request, requests, fmt, prefix, bool(body.get("progress"))), slot)
        return images_response(await _generate(worker, slot, request, requests), requests, fmt)

    @app.post("/v1/images/generations", **v1)
    async def generations(request: Request):
        return await answer(request, await read_json(request), None, "image_generation")

    @app.post("/v1/images/edits", **v1)
    async def edits(request: Request):
        fields, images = await read_uploads(request, max_upload_mb << 20)
        return await answer(request, fields, images, "image_edit")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


async def _generate(worker: Worker, slot: Slot, request, requests):
    try:
        return await worker.run(slot, request, requests)
    except (ValueError, RuntimeError) as e:  # checks the pipeline makes late, non-finite outputs
        raise ApiError(400 if isinstance(e, ValueError) else 500, " ".join(str(e).split())) from None


def _version() -> str:
    from . import __version__

    return __version__


def build_parser():
    prog = prog_name("python -m mlx_glm_image.server")
    p = Parser(prog=prog, description=__doc__.replace("python -m mlx_glm_image.server", prog),
               formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_model_arguments(p, model_required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (needed for a non-loopback --host)")
    p.add_argument("--no-auth", action="store_true", help="serve a non-loopback --host without an API key")
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting or running before 429 (default: %(default)s)")
    p.add_argument("--max-upload-mb", type=int, default=20, help="largest image upload for edits (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS, metavar="N",
                   help="longest prompt as the AR model reads it: its text, its condition images' tokens (a longer "
                        "one is a 400; default: %(default)s, a long prompt and three large condition images)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds SIGINT/SIGTERM waits for the request in progress before exiting (default: %(default)s)")
    add_cache_arguments(p.add_argument_group("step cache for every request that does not set its own \"cache\" "
                                             "(true, false or cache-dit's fields)"))
    return p


def check_host(host: str, api_key: str | None, no_auth: bool):
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key and not no_auth:
        raise ValueError(f"--host {host} is reachable from other machines: set --api-key (or pass --no-auth)")


def url(host: str, port: int) -> str:
    """The server's address as a browser takes it: an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_cache_blocks(cache_config, dit_blocks: int):
    """The step cache's flags fit the DiT's blocks, as each request's would be checked."""
    try:
        cache_config.check_blocks(dit_blocks)
    except ValueError as e:
        raise ValueError(f"--Fn-compute-blocks/--Bn-compute-blocks: {e}") from None


def listen(host: str, port: int) -> socket.socket:
    """The bound socket the server will serve on: bound here, before the model loads, so that a port in use or a
    host that does not resolve fails in one line at once."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be from 1 to 65535, got {port}")
    try:
        # IPv6 only for an IPv6 address, as uvicorn binds: "localhost" stays 127.0.0.1, whatever /etc/hosts lists first
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        family, kind, proto, _, address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(app, sock: socket.socket, grace: float):
    """uvicorn on ``sock`` until SIGINT or SIGTERM. The worker's own deadline answers what is still in progress
    after ``grace`` seconds in the envelope; uvicorn's, a moment later, would cancel it with a plain-text 500."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.worker.stop(grace)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace + SHUTDOWN_MARGIN))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # the SIGINT uvicorn raises again once it has shut down
        pass
    if not server.started:
        raise RuntimeError("the server did not start")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        import uvicorn  # noqa: F401 - imported now: without the server extra, one line before the model loads

        from .pipeline import GlmImagePipeline

        check_host(args.host, args.api_key, args.no_auth)
        if args.max_queue < 1 or args.max_upload_mb < 1 or args.max_prompt_tokens < 1:
            raise ValueError("--max-queue, --max-upload-mb and --max-prompt-tokens must be at least 1")
        if not args.grace >= 0:  # NaN too
            raise ValueError(f"--grace must be a number of seconds >= 0, got {args.grace}")
        adapters = lora_entries(args.lora)  # before anything is read: a bad --lora is one line at start
        sock = listen(args.host, args.port)
        cache = cache_settings(args)
        defaults = {"cache_config": cache["cache"], "calibrator_config": cache["calibrator"]} if cache else None
        pipe = GlmImagePipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize, memory=args.memory)
        if cache:  # the DiT's config says it, before any weight is read: not refused per request later
            check_cache_blocks(cache["cache"], pipe.components.facts.dit_blocks)
        load_adapters(pipe, adapters)
        app = create_app(pipe, str(args.model), args.api_key, args.max_queue, args.max_upload_mb, defaults,
                         args.max_prompt_tokens)
        print(f"serving {args.model} on {url(args.host, args.port)}/v1 (memory: {pipe.memory})", flush=True)
        serve(app, sock, args.grace)
    except ModuleNotFoundError as e:
        return fail(ValueError(f"{e.name} is missing: pip install 'mlx-glm-image[server]'"))
    except (ValueError, RuntimeError, OSError) as e:
        return fail(e)
    except KeyboardInterrupt:  # before serving (uvicorn meets it after): while the model's configs are read, say
        print("interrupted; the server did not start", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from .cli import done

    sys.exit(done(main()))
