"""The OpenAI-compatible server as a subprocess on 127.0.0.1, driven by the official openai client (tiny checkpoint)."""

import base64
import http.client
import io
import json
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from commands import assert_one_line, cli, run, start
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

FAST = {"seed": 7, "num_inference_steps": 1, "top_k": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *args):
        self.port = free_port()
        self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: a server that logs much never blocks on it
        self.proc = start("server", "-m", model, "--port", self.port, "--dtype", "float32", *args, stderr=self.stderr)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, **kw)

    def log(self) -> str:
        """What the server wrote to stderr so far."""
        self.stderr.seek(0)
        return self.stderr.read()

    def raw(self, method: str, path: str, body=b"", headers=None, timeout=60) -> tuple[int, dict, bytes]:
        """One HTTP request as given (any body, any headers); the status, headers and body of the answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def rss_mb(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-queue", 8, "--memory", "resident")
    yield s
    s.stop()


def envelope(data: bytes) -> dict:
    """The error of OpenAI's envelope, checked to be one."""
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), error
    return error


def decode(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))))


def png_file(tmp_path, name, size, seed=0):
    path = tmp_path / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_generations_with_the_openai_client(server):
    client = server.client()
    out = client.images.generate(model="glm-image", prompt='a red cat "big"', n=2, size="96x64", extra_body=FAST)
    images = [decode(d) for d in out.data]
    assert [im.shape for im in images] == [(64, 96, 3)] * 2 and out.size == "96x64"
    assert [d.model_extra["seed"] for d in out.data] == [7, 8] and out.data[0].revised_prompt == 'a red cat "big"'
    assert not np.array_equal(images[0], images[1])
    again = client.images.generate(prompt='a red cat "big"', n=1, size="96x64", extra_body=FAST)
    assert np.array_equal(decode(again.data[0]), images[0]), "the same seed gives the same image"
    jpeg = client.images.generate(prompt="a cat", size="64x64", extra_body={**FAST, "output_format": "jpeg"})
    assert Image.open(io.BytesIO(base64.b64decode(jpeg.data[0].b64_json))).format == "JPEG"
    assert [m.id for m in client.models.list().data] == [str(server.proc.args[4])]


def test_edits_with_one_and_two_images(server, tmp_path):
    client = server.client()
    a, b = png_file(tmp_path, "a.png", (96, 64)), png_file(tmp_path, "b.png", (64, 64), seed=1)
    with open(a, "rb") as f:
        one = client.images.edit(image=f, prompt="make it red", extra_body=FAST)
    assert decode(one.data[0]).shape == (64, 96, 3), "default size: the first image's, rounded to 32"
    with open(a, "rb") as f1, open(b, "rb") as f2:
        two = client.images.edit(image=[f1, f2], prompt="make it red", size="64x64", n=2, extra_body=FAST)
    assert [decode(d).shape for d in two.data] == [(64, 64, 3)] * 2


def test_bad_requests_are_openai_errors(server, tmp_path):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="multiples of 32"):
        client.images.generate(prompt="x", size="100x64", extra_body=FAST)
    with pytest.raises(openai.BadRequestError, match="steps must be an integer from 1 to 1000"):
        client.images.generate(prompt="x", size="64x64", extra_body={"num_inference_steps": 0})
    with pytest.raises(openai.BadRequestError, match="response_format 'url' is not served"):
        client.images.generate(prompt="x", size="64x64", response_format="url", extra_body=FAST)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with open(tmp_path / "junk.png", "rb") as f, pytest.raises(openai.BadRequestError, match="cannot read condition image junk.png"):
        client.images.edit(image=f, prompt="x", extra_body=FAST)
    ok = client.images.generate(prompt="x", size="64x64", extra_body=FAST)  # the server is still fine
    assert decode(ok.data[0]).shape == (64, 64, 3)


def test_the_step_cache_as_body_fields(server):
    client = server.client()
    plain = client.images.generate(prompt="a cat", size="96x64", extra_body={**FAST, "num_inference_steps": 6})
    cache = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 1, "residual_diff_threshold": 0.9}
    cached = client.images.generate(prompt="a cat", size="96x64", extra_body={**FAST, "num_inference_steps": 6,
                                                                               "cache": cache})
    assert not np.array_equal(decode(plain.data[0]), decode(cached.data[0]))
    with pytest.raises(openai.BadRequestError, match="cache: unknown field 'Fn'"):
        client.images.generate(prompt="x", size="64x64", extra_body={**FAST, "cache": {"Fn": 1}})
    with pytest.raises(openai.BadRequestError, match="must be at most the DiT's 2 blocks"):
        client.images.generate(prompt="x", size="64x64", extra_body={**FAST, "cache": True})


def test_streaming_with_the_openai_client(server, tmp_path):
    """OpenAI's image stream: partial images (the previews), then the completed image, which equals the unstreamed
    one and carries its metadata, so the CLI makes it again from the file."""
    client = server.client()
    body = {**FAST, "num_inference_steps": 6}
    events = list(client.images.generate(prompt='a red cat "big"', size="96x64", stream=True, partial_images=2,
                                         extra_body=body))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1] and events[-1].size == "96x64"
    assert events[-1].usage.output_tokens == 2 * 3 + 13 * 19 + 1, "the AR tokens of a 64x96 image"
    plain = client.images.generate(prompt='a red cat "big"', size="96x64", extra_body=body)
    assert np.array_equal(decode(events[-1]), decode(plain.data[0])), "streamed or not, the same image"
    only = list(client.images.generate(prompt='a red cat "big"', size="96x64", stream=True, extra_body=body))
    assert [e.type for e in only] == ["image_generation.completed"], "partial_images 0: the completed event alone"

    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(events[-1].b64_json))
    assert json.loads(Image.open(served).text["glm-image"])["seed"] == 7
    proc = cli("--config-from-metadata", served, "--output", tmp_path / "again.png", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), decode(events[-1]))

    src = png_file(tmp_path, "src.png", (96, 64))
    with open(src, "rb") as f:
        edits = list(client.images.edit(image=f, prompt="make it red", stream=True, partial_images=1, extra_body=body))
    assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]
    with pytest.raises(openai.BadRequestError, match="partial_images must be from 0 to 3, got 4"):
        list(client.images.generate(prompt="x", size="64x64", stream=True, partial_images=4, extra_body=FAST))
    with pytest.raises(openai.BadRequestError, match="partial_images must be from 0 to 3, got -1") as caught:
        list(client.images.generate(prompt="x", size="64x64", stream=True, partial_images=-1, extra_body=FAST))
    assert caught.value.param == "partial_images", "OpenAI's field, not the pipeline's setting behind it"

    two = list(client.images.generate(prompt="a cat", size="64x64", n=2, stream=True, partial_images=1, extra_body=body))
    assert [(e.type, e.image_index) for e in two] == [("image_generation.partial_image", 0),
                                                      ("image_generation.partial_image", 1),
                                                      ("image_generation.completed", 0),
                                                      ("image_generation.completed", 1)], "each image's events say which"


def test_concurrent_requests_all_answered_and_memory_flat(server):
    client = server.client()
    results = []

    def ask(i):
        results.append(client.images.generate(prompt=f"a cat {i}", size="64x64", extra_body={**FAST, "seed": i}))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3
    client.images.generate(prompt="warm", size="64x64", extra_body=FAST)
    before = server.rss_mb()
    for i in range(30):
        client.images.generate(prompt="a cat", size="64x64", extra_body={**FAST, "seed": i})
    grown = server.rss_mb() - before
    print(f"server RSS over 30 sequential requests: {before:.0f} MB -> {before + grown:.0f} MB")
    assert grown < 50, f"memory grew by {grown:.0f} MB over 30 requests"


def test_api_key_and_full_queue(model_dir):
    s = Server(model_dir, "--api-key", "secret", "--max-queue", 1)
    try:
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
            s.client("wrong").images.generate(prompt="x", size="64x64", extra_body=FAST)
        client = s.client("secret")
        errors, done = [], []

        def ask():
            try:
                # 1000 steps (~2 s here): the first is still running when the others come, however fast the machine
                done.append(client.images.generate(prompt="x", size="96x64", extra_body={"seed": 1, "num_inference_steps": 1000}))
            except openai.RateLimitError as e:
                errors.append(e)

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join(timeout=300)
        assert errors and done, (len(errors), len(done))
        assert "queue" in str(errors[0])
        # a stream too: a 429 before it starts, which the client can retry (once an error event in a 200)
        holder = client.images.generate(prompt="x", size="128x128", stream=True,
                                        extra_body={"seed": 1, "num_inference_steps": 1000, "progress": True})
        next(iter(holder))  # admitted and running: the queue (--max-queue 1) is full
        with pytest.raises(openai.RateLimitError, match="queue"):
            client.images.generate(prompt="y", size="64x64", stream=True, extra_body=FAST)
        holder.close()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def nan_vae_server(model_dir, tmp_path_factory):
    """A server of the tiny pipeline whose VAE decodes to NaN."""
    from safetensors.numpy import load_file, save_file

    model = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("nan-vae") / "model"))
    for shard in (model / "vae").glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: np.full_like(v, np.nan) if k.startswith("decoder.conv_out") else v for k, v in tensors.items()}, shard)
    s = Server(model, "--memory", "resident")
    yield s
    s.stop()


def test_a_stream_that_fails_ends_with_an_error_event(nan_vae_server):
    s = nan_vae_server
    with pytest.raises(openai.APIError, match="non-finite pixels"):
        list(s.client().images.generate(prompt="x", size="64x64", stream=True, extra_body=FAST))
    assert s.client().models.list().data, "the server goes on serving"


def test_nan_weights_fail_that_request_only(nan_vae_server):
    client = nan_vae_server.client()
    with pytest.raises(openai.InternalServerError, match="non-finite pixels"):
        client.images.generate(prompt="x", size="64x64", extra_body=FAST)
    out = client.models.list()  # the server is still serving
    assert out.data


def test_sigint_stops_within_seconds(model_dir):
    s = Server(model_dir)
    t0 = time.time()
    s.proc.send_signal(signal.SIGINT)
    s.proc.wait(timeout=20)
    assert time.time() - t0 < 10 and "Traceback" not in s.log()


def test_a_public_host_needs_a_key(model_dir):
    proc = run("server", "-m", model_dir, "--host", "0.0.0.0", timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: --host 0.0.0.0 is reachable from other machines: set --api-key (or pass --no-auth)")


def test_an_ipv6_host_is_printed_as_a_url(model_dir):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    port = free_port()
    proc = start("server", "-m", model_dir, "--host", "::1", "--port", port, "--dtype", "float32")
    try:
        line = proc.stdout.readline()
        if not line and "cannot listen on ::1" in proc.stderr.read():
            pytest.skip("no IPv6 loopback here")
        assert line.startswith(f"serving {model_dir} on http://[::1]:{port}/v1 "), line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_step_cache_flags_past_the_dits_blocks_are_refused_at_start(model_dir):
    """The DiT's config says how many blocks it has: --Fn 5 (and the preset's --Bn 1) on the tiny 2-block DiT is one
    line at start, not a server that refuses every request."""
    proc = run("server", "-m", model_dir, "--Fn", 5, timeout=60)
    assert_one_line(proc, "--Fn-compute-blocks/--Bn-compute-blocks: Fn_compute_blocks + Bn_compute_blocks (5 + 1) "
                          "must be at most the DiT's 2 blocks")
    assert "serving" not in proc.stdout


def test_a_client_that_disconnects_frees_its_slot(model_dir):
    s = Server(model_dir, "--max-queue", 2, "--memory", "resident")
    try:
        client = s.client()
        client.images.generate(prompt="warm", size="64x64", extra_body=FAST)
        outcome = []
        long = threading.Thread(target=lambda: outcome.append(client.images.generate(
            prompt="x", size="128x128", extra_body={"seed": 1, "num_inference_steps": 1000})))
        long.start()
        time.sleep(0.5)
        with pytest.raises(openai.APITimeoutError):  # waits behind the long one, then gives up
            s.client(timeout=1.0).images.generate(prompt="y", size="64x64", extra_body=FAST)
        time.sleep(2.0)
        assert long.is_alive(), "the long request should still be running"
        out = client.images.generate(prompt="z", size="64x64", extra_body=FAST)  # not 429: the slot was freed
        assert decode(out.data[0]).shape == (64, 64, 3)
        long.join(timeout=300)
        assert outcome and decode(outcome[0].data[0]).shape == (128, 128, 3)
    finally:
        s.stop()


def test_a_client_that_disconnects_while_running_stops_its_generation(model_dir):
    """The generation stops at its next token or step: the next request starts at once, not after 1000 steps."""
    s = Server(model_dir, "--memory", "resident")
    try:
        client = s.client()
        client.images.generate(prompt="warm", size="64x64", extra_body=FAST)
        t0 = time.time()
        one_step = client.images.generate(prompt="x", size="128x128", extra_body={"seed": 1, "num_inference_steps": 1})
        step = time.time() - t0  # about the cost of one request at that size (AR grid included)
        with pytest.raises(openai.APITimeoutError):
            s.client(timeout=2.0).images.generate(prompt="x", size="128x128",
                                                   extra_body={"seed": 1, "num_inference_steps": 1000})
        left = time.time()
        out = client.images.generate(prompt="z", size="64x64", extra_body=FAST)
        waited = time.time() - left
        print(f"from the disconnect to the next answer: {waited:.2f} s (one 128x128 request: {step:.2f} s)")
        assert decode(out.data[0]).shape == (64, 64, 3) and decode(one_step.data[0]).shape == (128, 128, 3)
        assert waited < 10, "the abandoned generation kept the worker"
    finally:
        s.stop()


def test_a_stream_closed_early_stops_its_generation(model_dir):
    """... and leaves nothing behind: the log once filled with "Task was destroyed but it is pending!" (the task
    that waited for the next event), one or two per closed stream."""
    s = Server(model_dir, "--memory", "resident")
    try:
        client = s.client()
        client.images.generate(prompt="warm", size="64x64", extra_body=FAST)
        for _ in range(3):
            stream = client.images.generate(prompt="x", size="128x128", stream=True, partial_images=3,
                                            extra_body={"seed": 1, "num_inference_steps": 1000, "progress": True})
            first = next(iter(stream))
            assert first.type == "image_generation.progress", first  # the page's progress events, asked for
            stream.close()
        left = time.time()
        out = client.images.generate(prompt="z", size="64x64", extra_body=FAST)
        waited = time.time() - left
        print(f"from closing the stream to the next answer: {waited:.2f} s")
        assert decode(out.data[0]).shape == (64, 64, 3) and waited < 10
    finally:
        s.stop()
    assert "Task was destroyed" not in s.log() and "never retrieved" not in s.log(), s.log()
    assert len(re.findall("stopped a generation whose request ended", s.log())) == 3, s.log()


def prompt_tokens(model_dir, prompt, images=(), size=(128, 128)) -> int:
    """The AR model's input for ``prompt`` (and condition image files), as its processor builds it."""
    from mlx_glm_image.pipeline.processor import GlmImageProcessor

    content = [{"type": "image", "image": Image.open(i)} for i in images] + [{"type": "text", "text": prompt}]
    inputs = GlmImageProcessor.from_pretrained(model_dir).apply_chat_template(
        [[{"role": "user", "content": content}]], target_h=size[1], target_w=size[0])
    return inputs["input_ids"].shape[1]


def test_a_client_that_leaves_during_the_prefill_stops_it(server, model_dir):
    """A long prompt's prefill stops at its next chunk when the client leaves (a 20k-token prompt once held the
    server for minutes after its client had gone): the log says where the run stopped, a chunk or so after the
    one the client saw last, far from the prefill's end; the next request runs."""
    prompt = "a red cat " * 5000  # 30 chunks of the prefill (some 20 s here), under the default limit
    stream = server.client().images.generate(prompt=prompt, size="64x64", stream=True,
                                             extra_body={**FAST, "progress": True})
    for e in stream:
        assert e.event != "token", "the prefill's chunks come before the first token, each with its event"
        if e.event == "prefill" and e.index >= 9:
            break
    stream.close()
    out = server.client().images.generate(prompt="z", size="64x64", extra_body=FAST)
    assert decode(out.data[0]).shape == (64, 64, 3)
    stopped = re.findall(r"stopped a generation .* after prefill chunk (\d+) of (\d+)", server.log())
    print(f"the client left after prefill chunk {e.index + 1} of {e.total}; the run stopped after chunk {stopped}")
    assert stopped and int(stopped[-1][1]) == e.total == -(-prompt_tokens(model_dir, prompt, (), (64, 64)) // 512)
    assert e.index + 1 <= int(stopped[-1][0]) <= e.index + 4, "the chunks run after the client left: a few at most"


def test_a_prompt_past_max_prompt_tokens_is_a_400_before_any_work(model_dir, tmp_path):
    """The count is the AR model's input as the processor builds it (text, condition images' tokens, grid
    sizes), refused before the request waits in the queue; the limit is the server's flag."""
    big = png_file(tmp_path, "big.png", (128, 128))
    cases = [("a red cat " * 20, []), ("x", [big, big])]
    counts = [prompt_tokens(model_dir, p, i) for p, i in cases]
    assert min(counts) > 30 >= prompt_tokens(model_dir, "x"), counts
    s = Server(model_dir, "--memory", "resident", "--max-prompt-tokens", 30)
    try:
        client = s.client()
        for (prompt, images), count in zip(cases, counts):
            with pytest.raises(openai.BadRequestError) as caught:
                if images:
                    with open(images[0], "rb") as f1, open(images[1], "rb") as f2:
                        client.images.edit(image=[f1, f2], prompt=prompt, size="128x128", extra_body=FAST)
                else:
                    client.images.generate(prompt=prompt, size="128x128", extra_body=FAST)
            assert caught.value.param == "prompt" and caught.value.code == "prompt_too_long"
            assert f"the prompt is {count} tokens" in str(caught.value), caught.value
            assert "at most 30 (--max-prompt-tokens)" in str(caught.value)
        assert decode(client.images.generate(prompt="x", size="128x128", extra_body=FAST).data[0]).shape == (128, 128, 3)
        assert "stopped a generation" not in s.log(), "refused before any work"
    finally:
        s.stop()


def test_an_upload_over_the_limit_is_413(model_dir, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1 << 20
    s = Server(model_dir, "--max-upload-mb", 1)
    try:
        with open(big, "rb") as f, pytest.raises(openai.APIStatusError) as caught:
            s.client().images.edit(image=f, prompt="x", extra_body=FAST)
        assert caught.value.status_code == 413 and "limited to 1 MB" in str(caught.value)
    finally:
        s.stop()


def png_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(fields: dict, files: list) -> tuple[bytes, str]:
    """A multipart/form-data body of text ``fields`` and ``files`` (field name, file name, bytes); its content type."""
    boundary = "mlx-glm-image-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for k, name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_json(server, body, timeout=60) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.raw("POST", "/v1/images/generations", data, {"Content-Type": "application/json"}, timeout=timeout)


def test_a_json_body_over_the_limit_is_413_and_the_server_lives(model_dir):
    """A 5 MB prompt once took the process down: the body is refused before it is parsed, with or without a
    Content-Length; a prompt under that bound but past the AR model's positions is the request checks' 400."""
    s = Server(model_dir, "--memory", "resident")
    try:
        body = json.dumps({"prompt": "a red cat " * 500_000, "size": "64x64", **FAST}).encode()
        status, _, data = post_json(s, body)
        assert status == 413 and "at most 1 MB" in envelope(data)["message"], (status, data[:300])
        chunks = (body[i:i + (1 << 16)] for i in range(0, len(body), 1 << 16))  # chunked: counted as it comes
        status, _, data = s.raw("POST", "/v1/images/generations", chunks, {"Content-Type": "application/json"})
        assert status == 413 and envelope(data)["code"] == "body_too_large"
        with pytest.raises(openai.BadRequestError, match="the prompt is too long"):
            s.client(timeout=60).images.generate(prompt="a red cat " * 90_000, size="64x64", extra_body=FAST)
        ok = s.client().images.generate(prompt="a cat", size="64x64", extra_body=FAST)
        assert decode(ok.data[0]).shape == (64, 64, 3) and "Traceback" not in s.log()
    finally:
        s.stop()


# (field, value): each a 400 naming the field. JSON bodies carry JSON's types (a string is not a number); the
# OpenAI fields this server does not use are checked all the same.
WRONG_JSON_TYPES = [
    ("output_format", []), ("output_format", {}), ("output_format", 0), ("output_format", ["png"]), ("output_format", ""),
    ("response_format", ["url"]), ("response_format", "jpg"), ("n", "2"), ("n", True), ("n", 1.0), ("seed", "7"),
    ("num_inference_steps", "1"), ("guidance_scale", "1.5"), ("top_k", [1]), ("cache", "true"), ("calibrator", 2),
    ("stream", "false"), ("stream", 1), ("progress", [1]), ("partial_images", 7), ("size", "\u00b2x64"),
    ("size", "\u096c\u096ax\u096c\u096a"), ("size", "1" * 5000 + "x64"), ("size", 64), ("quality", [1]),
    ("background", {}), ("moderation", []), ("user", 5), ("model", ["x"]), ("style", 1), ("output_compression", "x"),
    ("prompt", ["x"]), ("temperature", 10**400),
]
# the same in a form (edits), where every value is text that must read as its field's type
WRONG_FORM_TEXT = [("n", "1_0"), ("n", "\u0661"), ("n", " 1"), ("size", "\u096c\u096ax\u096c\u096a"), ("stream", "yes"),
                   ("progress", "x"), ("output_compression", "abc"), ("output_format", ""), ("partial_images", "7"),
                   ("cache", "{"), ("seed", "nan")]


def test_every_body_field_is_type_checked(server):
    for field, value in WRONG_JSON_TYPES:
        status, _, data = post_json(server, {"prompt": "x", "size": "64x64", **FAST, field: value})
        assert status == 400 and envelope(data)["param"] == field, (field, value, status, data[:200])
    fields = {"prompt": "x", "size": "64x64", **{k: str(v) for k, v in FAST.items()}}
    for field, value in WRONG_FORM_TEXT:
        body, kind = multipart({**fields, field: value}, [("image", "a.png", png_bytes())])
        status, _, data = server.raw("POST", "/v1/images/edits", body, {"Content-Type": kind})
        assert status == 400 and envelope(data)["param"] == field, (field, value, status, data[:200])
    body, kind = multipart({**fields, "stream": "false", "n": "2"}, [("image", "a.png", png_bytes())])
    status, _, data = server.raw("POST", "/v1/images/edits", body, {"Content-Type": kind})
    assert status == 200 and len(json.loads(data)["data"]) == 2, "a form's text of the right types is read"
    status, _, data = post_json(server, {"prompt": "x", "size": "64x64", **FAST, "guidance_scale": 3,
                                         "temperature": 2**64, "top_k": 0})
    assert status == 200, "a JSON number is a number: these integers reach MLX as floats"
    assert "Traceback" not in server.log()


def test_settings_past_what_the_pipeline_computes_are_400s(model_dir):
    """Before: a guidance of 1e308 overflowed into a NaN (a 500 blaming the weights), a TaylorSeer order of 2**64
    into an OverflowError; both are bounded by their checks now."""
    s = Server(model_dir, "--memory", "resident")  # its own: a 500 logs a traceback
    try:
        cache = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 0}
        for settings in ({"guidance_scale": 1e308}, {"cache": cache, "calibrator": {"taylorseer_order": 2**64}}):
            status, _, data = post_json(s, {"prompt": "x", "size": "64x64", **FAST, "num_inference_steps": 3, **settings})
            assert status == 400, (settings, data[:300])
    finally:
        s.stop()


def test_odd_bodies_paths_and_methods_are_envelopes(server):
    for body, status in ((b"[" * 100_000, 400), (b"NaN", 400), (b"{", 400), (b"\xff", 400), (b"[]", 400)):
        got, _, data = post_json(server, body)
        assert got == status and envelope(data)["type"] == "invalid_request_error", (body[:10], got, data[:200])
    for method, path, status in (("GET", "/v1/images/generations", 405), ("GET", "/v1/nope", 404), ("DELETE", "/health", 405)):
        got, _, data = server.raw(method, path)
        assert got == status and envelope(data), (method, path, got, data)
    got, _, data = server.raw("POST", "/v1/images/edits", b"junk", {"Content-Type": "multipart/form-data; boundary=x"})
    assert got == 400 and envelope(data)
    assert "Traceback" not in server.log()


def test_a_bad_port_or_host_is_one_line_before_the_model_loads(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in ((["--port", "99999"], "error: --port must be from 1 to 65535, got 99999"),
                              (["--port", str(port)], f"error: cannot listen on 127.0.0.1:{port}: "),
                              (["--host", "no.such.host.invalid", "--no-auth"], "error: cannot listen on no.such.host.invalid:8000: ")):
            proc = run("server", "-m", model_dir, *args, timeout=60)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(message), (args, proc.stderr)
            assert "serving" not in proc.stdout, "refused before the model loads"


def test_requests_past_the_grace_period_get_the_envelope(model_dir):
    """SIGINT with a generation running and a stream waiting: after --grace seconds each is answered (a 503, an
    error event), not cut off with a plain-text 500."""
    s = Server(model_dir, "--memory", "resident", "--grace", 1)
    try:
        s.client().images.generate(prompt="warm", size="64x64", extra_body=FAST)
        long = {"prompt": "x", "size": "128x128", "seed": 1, "num_inference_steps": 1000}
        answers = {}

        def plain():
            answers["plain"] = post_json(s, long)

        def stream():
            try:
                answers["stream"] = list(s.client().images.generate(prompt="y", size="64x64", stream=True,
                                                                    extra_body=FAST))
            except openai.APIError as e:
                answers["stream"] = e

        threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in threads:
            t.start()
            time.sleep(0.5)
        s.proc.send_signal(signal.SIGINT)
        for t in threads:
            t.join(timeout=30)
        s.proc.wait(timeout=30)
        status, _, data = answers["plain"]
        assert status == 503 and "--grace" in envelope(data)["message"], (status, data)
        assert isinstance(answers["stream"], openai.APIError) and "--grace" in str(answers["stream"]), answers["stream"]
        assert "Traceback" not in s.log(), s.log()
    finally:
        s.stop()
