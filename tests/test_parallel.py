"""Several processes with MLX's distributed runtime: `mlx.launch -n 2 --backend ring` on this machine's CPU, the CLI
as a subprocess, tiny checkpoint. cfg, data and tensor parallel give the single-process images; a killed rank stops
the run."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from commands import LAUNCH, ROOT, argv, cli, cli_ok, ring
from PIL import Image

from mlx_glm_image.convert import convert

pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")
ARGS = ["--height", "64", "--width", "96", "--steps", "3", "--top-k", "1", "--dtype", "float32", "--quiet"]


def launch(*args, n=2, wait=True):
    cmd = [*ring(n), "--", *argv("generate", *args)]
    # a session of its own: a test that fails midway ends the launcher and every rank at once (os.killpg)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(Image.open(a)).astype(int) - np.asarray(Image.open(b)).astype(int)).max())


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory) -> dict:
    """What one process makes of the prompt the cfg and tensor runs are given, to text ("t2i") and editing an image
    ("edit"): {kind: (the run's arguments, its image)}."""
    here = tmp_path_factory.mktemp("one-process")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(here / "source.png")
    made = {}
    for kind, extra in (("t2i", []), ("edit", ["--image", here / "source.png"])):
        args = ["-m", model_dir, "--prompt", 'a red cat "big"', *ARGS, *extra, "--seed", 3]
        cli_ok(*args, "--output", here / f"{kind}.png", timeout=300)
        made[kind] = args, here / f"{kind}.png"
    return made


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_cfg_on_two_ranks_equals_one_process(one_process, tmp_path, kind):
    args, one = one_process[kind]
    code, out, err = launch(*args, "--parallel", "cfg", "--output", tmp_path / "two.png")
    assert code == 0, err
    assert max_diff(tmp_path / "two.png", one) <= 1
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["two.png"]


def test_data_on_two_ranks_writes_the_same_files(model_dir, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    seeds = [1, 2, 3, 4]
    cli_ok("-m", model_dir, "--prompt", "a cat", *ARGS, "--seed", *seeds, "--output", tmp_path / "one" / "d_{seed}.png",
           timeout=300)
    code, out, err = launch("-m", model_dir, "--prompt", "a cat", *ARGS[:-1], "--seed", *seeds, "--parallel", "data",
                            "--output", tmp_path / "two" / "d_{seed}.png")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"d_{s}.png" for s in seeds]
    for name in names:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / name)), np.asarray(Image.open(tmp_path / "two" / name)))
    listed = [line for line in out.splitlines() if line.startswith("image ")]
    assert len(listed) == 4 and len(set(listed)) == 4, out  # every file once, by rank 0


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and b"mlx_glm_image.generate" in cmd and _descends(int(proc.name), launcher_pid):
            return int(proc.name)
    return None


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(5):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if pid == ancestor:
            return True
    return False


class _Output:
    """A running process's stdout and stderr, read as they come on threads of their own, so that a test can wait
    for a line without blocking past its deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((proc.stdout, self.out), (proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list):
        for line in stream:
            lines.append(line)

    def wait_for(self, text: str, timeout: float) -> bool:
        """Whether a line of stdout holds ``text`` within ``timeout`` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in list(self.out)):
                return True
            time.sleep(0.2)
        return False

    def text(self) -> tuple[str, str]:
        """(stdout, stderr): all of it once the process has ended, what came so far before."""
        for reader in self.readers:
            reader.join(timeout=5)
        return "".join(self.out), "".join(self.err)


@pytest.mark.parametrize("mode", ["cfg", "tensor"])
def test_a_killed_rank_stops_the_other_with_one_line(model_dir, tmp_path, mode):
    proc = launch("-m", model_dir, "--prompt", "a cat", "--height", "128", "--width", "128", "--steps", "1000", "--top-k", "1",
                  "--dtype", "float32", "--seed", 1, "--parallel", mode, "--parallel-timeout", "20",
                  "--output", tmp_path / "never.png", wait=False)
    output = _Output(proc)
    try:
        # into the denoising loop (1000 steps), however long a loaded machine takes to get there
        assert output.wait_for("loaded transformer", timeout=240), output.text()
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 is not running"
        time.sleep(1)
        t0 = time.time()
        subprocess.run(["kill", "-9", str(pid)])
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = output.text()
    assert time.time() - t0 < 45  # at worst the watchdog's 20 s
    errors = [line for line in (out + err).splitlines() if line.startswith("error: ")]
    assert errors and "rank 0" in errors[0] and ("stop" in errors[0] or "lost" in errors[0]), out + err
    # mlx.launch reports each process's exit code: 1 from the error, or SIGTERM when the launcher was first
    assert re.search(r"rank 0 exited with code (1|-15)\b", out + err), out + err
    assert "Traceback" not in out + err
    assert not (tmp_path / "never.png").exists()


def test_parallel_needs_a_fitting_group(model_dir, tmp_path):
    proc = cli("-m", model_dir, "--prompt", "x", "--parallel", "cfg", "--output", tmp_path / "x.png")
    assert proc.returncode == 1 and proc.stderr.startswith("error: --parallel needs several processes: run it under mlx.launch")
    code, out, err = launch("-m", model_dir, "--prompt", "x", *ARGS, "--parallel", "cfg", "--output", tmp_path / "x.png", n=3)
    # mlx.launch itself exits 0 and reports each process's exit code
    assert "--parallel cfg splits guidance over exactly 2 processes, got 3" in out + err
    assert re.search(r"rank \d exited with code 1\b", out + err)
    code, out, err = launch("-m", model_dir, "--prompt", "x", *ARGS, "--guidance", "1", "--parallel", "cfg",
                            "--output", tmp_path / "x.png")
    assert "it needs guidance > 1" in out + err and re.search(r"rank \d exited with code 1\b", out + err)
    assert not (tmp_path / "x.png").exists()


def placement(png) -> dict | None:
    return json.loads(Image.open(png).text["glm-image"])["parallel"]


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_tensor_on_two_ranks_equals_one_process(one_process, tmp_path, kind):
    args, one = one_process[kind]
    code, out, err = launch(*args, "--parallel", "tensor", "--output", tmp_path / "two.png")
    assert code == 0 and "Traceback" not in err, err
    # all-reduce rounding only (fp32): measured 1/255
    assert max_diff(tmp_path / "two.png", one) <= 2
    assert not (tmp_path / "two_1.png").exists(), "only rank 0 writes"
    assert placement(tmp_path / "two.png") == {"mode": "tensor", "ranks": 2} and placement(one) is None


def test_regenerating_a_tensor_split_image_in_one_process_says_it_may_differ(one_process, tmp_path):
    """Before: the record did not say the split, so one process regenerated another image (in bfloat16) silently.
    Now it runs as asked, with one line."""
    args, one = one_process["t2i"]
    code, out, err = launch(*args, "--parallel", "tensor", "--output", tmp_path / "two.png")
    assert code == 0, err
    again = cli_ok("--config-from-metadata", tmp_path / "two.png", "--quiet", "--output", tmp_path / "again.png",
                   timeout=300)
    assert again.stderr.splitlines() == [
        f"warning: --config-from-metadata {tmp_path / 'two.png'}: it was made with --parallel tensor on 2 processes "
        "and this run is in one process: a tensor split rounds differently, so the image may differ (slightly in "
        "float32, visibly in bfloat16: docs/parallel.md)"]
    assert max_diff(tmp_path / "again.png", one) == 0 and placement(tmp_path / "again.png") is None
    # an image of one process regenerated in one process: nothing to say
    assert cli_ok("--config-from-metadata", one, "--quiet", "--output", tmp_path / "b.png", timeout=300).stderr == ""


def _sharded_run(model_dir, mode, n, *extra):
    cmd = [*ring(n), "--", *argv("tests/sharded_run.py", model_dir, mode, *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[0])


def test_tensor_split_models_equal_whole_ones(model_dir, tmp_path):
    converted = tmp_path / "q4"
    convert(str(model_dir), converted, quantize=True, q_bits=4, q_group_size=32, verbose=False)
    two = _sharded_run(model_dir, "tensor", 2, converted)
    assert two["ar_relative"] < 1e-5 and two["ar_kv_heads_per_rank"] == 1
    # quantized shares: the same groups as the whole layer's, so the same numbers up to the all-reduce's rounding
    assert two["ar_load_time_4bit_relative"] < 1e-5 and two["ar_converted_4bit_relative"] < 1e-5
    assert two["ar_layer"] == "QuantizedShardedToAll"
    # four ranks, two KV heads: each rank computes the KV head its query heads read
    four = _sharded_run(model_dir, "cfg,tensor", 4)
    assert four["ar_relative"] < 1e-5 and four["ar_kv_heads_per_rank"] == 1
    assert four["dit_layer"] == "ShardedToAll" and four["image_max_pixel"] <= 2


def test_tensor_needs_several_processes(model_dir, tmp_path):
    proc = cli("-m", model_dir, "--prompt", "x", "--parallel", "tensor", "--output", tmp_path / "x.png")
    assert proc.returncode == 1 and proc.stderr.startswith("error: --parallel needs several processes")


class _Group:
    """Rank ``rank`` of a group of ``size``, for the checks that exchange nothing."""

    def __init__(self, size: int, rank: int):
        self.size, self.rank = (lambda: size), (lambda: rank)


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_checks_the_split_from_the_configs(model_dir, tmp_path, rank):
    """The placement's check, which runs before the ranks exchange anything, refuses what loading a model would
    refuse, with the loader's line, on every rank alike: from the configs, nothing read."""
    from mlx_glm_image import load_model
    from mlx_glm_image.loading import WeightsError
    from mlx_glm_image.models import GlmImageForConditionalGeneration, GlmImageTransformer2DModel
    from mlx_glm_image.pipeline.components import Components
    from mlx_glm_image.pipeline.parallel import TensorSplit
    from mlx_glm_image.quantize import quant_spec
    from mlx_glm_image.sharding import ShardingError

    placement = TensorSplit(_Group(2, rank))

    def check(source, quantize=None):
        components = Components(given={}, source=source, dtype="float32", quantize=quantize, memory="resident",
                                splits=placement.splits)
        placement.check_models(components)
        assert components.loads == 0

    check(model_dir)
    converted = {g: tmp_path / f"q{g}" for g in (32, 64)}
    for group, folder in converted.items():
        convert(str(model_dir), folder, quantize=True, q_bits=4, q_group_size=group, verbose=False)
    down = "model.language_model.layers.0.mlp.down_proj: a share of 96 inputs does not hold whole quantization groups of 64"
    attention = "transformer_blocks.0.attn1.to_out.0: a share of 16 inputs does not hold whole quantization groups of 32"
    refused = [(GlmImageForConditionalGeneration, model_dir, 4, down),  # -q 4: groups of 64
               (GlmImageForConditionalGeneration, converted[64], None, down),  # stored groups of 64
               # the AR model's shares of 96 hold groups of 32, the tiny DiT's 32-wide attention output does not
               (GlmImageTransformer2DModel, model_dir, quant_spec(4, 32), attention),
               (GlmImageTransformer2DModel, converted[32], None, attention)]
    for cls, source, quantize, line in refused:
        with pytest.raises(ShardingError) as early:
            check(source, quantize)
        with pytest.raises(ShardingError) as loading:
            load_model(cls, source, quantize=quantize, split=placement.splits[cls.component])
        assert str(early.value).startswith(line) and str(loading.value) == str(early.value)
    # a stored group size its mode does not take
    config = converted[64] / "vision_language_encoder" / "config.json"
    stored = json.loads(config.read_text())
    config.write_text(json.dumps({**stored, "quantization": {**stored["quantization"], "mode": "mxfp4"}}))
    with pytest.raises(WeightsError, match=r"config.json: mode mxfp4 takes bits \[4\] and group sizes \[32\], got bits 4, "
                                           r"group size 64"):
        check(converted[64])


@contextmanager
def busy_cores(n: int = 2):
    """``n`` processes spinning beside the test: the machine as loaded as a busy runner's."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


@pytest.mark.parametrize("ranks, extra, line", [
    (4, [], "--parallel tensor splits the DiT over 4 ranks, but its attention heads (2) is not a multiple of 4"),
    (2, ["-q", "4"], "model.language_model.layers.0.mlp.down_proj: a share of 96 inputs does not hold whole "
                     "quantization groups of 64"),  # the tiny AR model's MLP (192 wide) in two shares of 96
], ids=["heads", "quantization-groups"])
def test_a_refused_split_says_why_on_a_loaded_machine(model_dir, tmp_path, ranks, extra, line):
    """Whatever the timing of the other ranks: every rank checks the split before any exchange, so the first to
    stop has said why (the launcher passes on every rank's output, then stops the others)."""
    with busy_cores():
        for _ in range(3):
            code, out, err = launch("-m", model_dir, "--prompt", "x", *ARGS[:-1], *extra, "--parallel", "tensor",
                                    "--output", tmp_path / "x.png", n=ranks)
            assert f"error: {line}" in err, out + err
            assert re.search(r"rank \d exited with code 1\b", err) and "Traceback" not in out + err
            assert "loaded" not in out, "refused before any model is read"
            assert not (tmp_path / "x.png").exists()
