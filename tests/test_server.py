"""The OpenAI-compatible server as a subprocess on 127.0.0.1, driven by the official openai client (tiny checkpoint)."""

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import write_pipeline

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
FAST = {"seed": 7, "num_inference_steps": 1, "top_k": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *args):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_glm_image.server", "-m", str(model), "--port",
                                      str(self.port), "--dtype", "float32", *map(str, args)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, **kw)

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
def model_dir(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("server") / "tiny-glm-image")


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-queue", 8, "--memory", "resident")
    yield s
    s.stop()


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
    proc = subprocess.run([sys.executable, "-m", "mlx_glm_image.generate", "--config-from-metadata", str(served),
                           "--output", str(tmp_path / "again.png"), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), decode(events[-1]))

    src = png_file(tmp_path, "src.png", (96, 64))
    with open(src, "rb") as f:
        edits = list(client.images.edit(image=f, prompt="make it red", stream=True, partial_images=1, extra_body=body))
    assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]
    with pytest.raises(openai.BadRequestError, match="partial_images must be from 0 to 3, got 4"):
        list(client.images.generate(prompt="x", size="64x64", stream=True, partial_images=4, extra_body=FAST))


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
                done.append(client.images.generate(prompt="x", size="96x64", extra_body={"seed": 1, "num_inference_steps": 30}))
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
    finally:
        s.stop()


def test_a_stream_that_fails_ends_with_an_error_event(model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    for shard in (model / "vae").glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: np.full_like(v, np.nan) if k.startswith("decoder.conv_out") else v for k, v in tensors.items()}, shard)
    s = Server(model, "--memory", "resident")
    try:
        with pytest.raises(openai.APIError, match="non-finite pixels"):
            list(s.client().images.generate(prompt="x", size="64x64", stream=True, extra_body=FAST))
        assert s.client().models.list().data, "the server goes on serving"
    finally:
        s.stop()


def test_nan_weights_fail_that_request_only(model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    for shard in (model / "vae").glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: np.full_like(v, np.nan) if k.startswith("decoder.conv_out") else v for k, v in tensors.items()}, shard)
    s = Server(model, "--memory", "resident")
    try:
        client = s.client()
        with pytest.raises(openai.InternalServerError, match="non-finite pixels"):
            client.images.generate(prompt="x", size="64x64", extra_body=FAST)
        out = client.models.list()  # the server is still serving
        assert out.data
    finally:
        s.stop()


def test_sigint_stops_within_seconds(model_dir):
    s = Server(model_dir)
    t0 = time.time()
    s.proc.send_signal(signal.SIGINT)
    s.proc.wait(timeout=20)
    assert time.time() - t0 < 10 and "Traceback" not in s.proc.stderr.read()


def test_a_public_host_needs_a_key(model_dir):
    proc = subprocess.run([sys.executable, "-m", "mlx_glm_image.server", "-m", str(model_dir), "--host", "0.0.0.0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=dict(os.environ))
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: --host 0.0.0.0 is reachable from other machines: set --api-key (or pass --no-auth)")


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
    s = Server(model_dir, "--memory", "resident")
    try:
        client = s.client()
        client.images.generate(prompt="warm", size="64x64", extra_body=FAST)
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
