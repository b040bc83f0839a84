"""Several processes with MLX's distributed runtime: `mlx.launch -n 2 --backend ring` on this machine's CPU, the CLI
as a subprocess, tiny checkpoint. cfg, data and tensor parallel give the single-process images; a killed rank stops
the run."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import write_pipeline

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = shutil.which("mlx.launch")
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")
ARGS = ["--height", "64", "--width", "96", "--steps", "3", "--top-k", "1", "--dtype", "float32", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("parallel") / "tiny-glm-image")


def single(*args):
    proc = subprocess.run([sys.executable, "-m", "mlx_glm_image.generate", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def launch(*args, n=2, wait=True):
    cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "--", sys.executable, "-m", "mlx_glm_image.generate", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(Image.open(a)).astype(int) - np.asarray(Image.open(b)).astype(int)).max())


@pytest.mark.parametrize("editing", [False, True], ids=["t2i", "edit"])
def test_cfg_on_two_ranks_equals_one_process(model_dir, tmp_path, editing):
    extra = []
    if editing:
        source = tmp_path / "source.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(source)
        extra = ["--image", source]
    single("-m", model_dir, "--prompt", 'a red cat "big"', *ARGS, *extra, "--seed", 3, "--output", tmp_path / "one.png")
    code, out, err = launch("-m", model_dir, "--prompt", 'a red cat "big"', *ARGS, *extra, "--seed", 3, "--parallel", "cfg",
                            "--output", tmp_path / "two.png")
    assert code == 0, err
    assert max_diff(tmp_path / "two.png", tmp_path / "one.png") <= 1
    assert sorted(p.name for p in tmp_path.glob("*.png") if p.name != "source.png") == ["one.png", "two.png"]


def test_data_on_two_ranks_writes_the_same_files(model_dir, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    seeds = [1, 2, 3, 4]
    single("-m", model_dir, "--prompt", "a cat", *ARGS, "--seed", *seeds, "--output", tmp_path / "one" / "d_{seed}.png")
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


@pytest.mark.parametrize("mode", ["cfg", "tensor"])
def test_a_killed_rank_stops_the_other_with_one_line(model_dir, tmp_path, mode):
    proc = launch("-m", model_dir, "--prompt", "a cat", "--height", "128", "--width", "128", "--steps", "1000", "--top-k", "1",
                  "--dtype", "float32", "--seed", 1, "--parallel", mode, "--parallel-timeout", "20",
                  "--output", tmp_path / "never.png", wait=False)
    deadline, pid = time.time() + 60, None
    while time.time() < deadline and pid is None:
        pid = _rank_pid(proc.pid, 1)
        time.sleep(0.2)
    assert pid is not None, "rank 1 did not start"
    time.sleep(4)  # well into the denoising loop
    t0 = time.time()
    subprocess.run(["kill", "-9", str(pid)])
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 45  # at worst the watchdog's 20 s
    errors = [line for line in (out + err).splitlines() if line.startswith("error: ")]
    assert errors and "rank 0" in errors[0] and ("stop" in errors[0] or "lost" in errors[0]), out + err
    # mlx.launch reports each process's exit code: 1 from the error, or SIGTERM when the launcher was first
    assert re.search(r"rank 0 exited with code (1|-15)\b", out + err), out + err
    assert "Traceback" not in out + err
    assert not (tmp_path / "never.png").exists()


def test_parallel_needs_a_fitting_group(model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlx_glm_image.generate", "-m", str(model_dir), "--prompt", "x",
                           "--parallel", "cfg", "--output", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --parallel needs several processes: run it under mlx.launch")
    code, out, err = launch("-m", model_dir, "--prompt", "x", *ARGS, "--parallel", "cfg", "--output", tmp_path / "x.png", n=3)
    # mlx.launch itself exits 0 and reports each process's exit code
    assert "--parallel cfg splits guidance over exactly 2 processes, got 3" in out + err
    assert re.search(r"rank \d exited with code 1\b", out + err)
    code, out, err = launch("-m", model_dir, "--prompt", "x", *ARGS, "--guidance", "1", "--parallel", "cfg",
                            "--output", tmp_path / "x.png")
    assert "it needs guidance > 1" in out + err and re.search(r"rank \d exited with code 1\b", out + err)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra", [[], ["--image"]], ids=["t2i", "edit"])
def test_tensor_on_two_ranks_equals_one_process(model_dir, tmp_path, extra):
    if extra == ["--image"]:
        source = tmp_path / "source.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(source)
        extra = ["--image", source]
    args = ["-m", model_dir, "--prompt", 'a red cat "big"', *ARGS, *extra, "--seed", 3]
    single(*args, "--output", tmp_path / "one.png")
    code, out, err = launch(*args, "--parallel", "tensor", "--output", tmp_path / "two.png")
    assert code == 0 and "Traceback" not in err, err
    # all-reduce rounding only (fp32): measured 1/255
    assert max_diff(tmp_path / "two.png", tmp_path / "one.png") <= 2
    assert not (tmp_path / "two_1.png").exists(), "only rank 0 writes"


def _sharded_run(model_dir, mode, n, *extra):
    cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "--", sys.executable, str(ROOT / "tests" / "sharded_run.py"),
           str(model_dir), mode, *map(str, extra)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[0])


def test_tensor_split_models_equal_whole_ones(model_dir, tmp_path):
    converted = tmp_path / "q4"
    subprocess.run([sys.executable, "-m", "mlx_glm_image.convert", "--hf-path", str(model_dir), "--mlx-path", str(converted),
                    "-q", "--q-bits", "4", "--q-group-size", "32"], check=True, capture_output=True, cwd=ROOT)
    two = _sharded_run(model_dir, "tensor", 2, converted)
    assert two["ar_relative"] < 1e-5 and two["ar_kv_heads_per_rank"] == 1
    # quantized shares: the same groups as the whole layer's, so the same numbers up to the all-reduce's rounding
    assert two["ar_load_time_4bit_relative"] < 1e-5 and two["ar_converted_4bit_relative"] < 1e-5
    assert two["ar_layer"] == "QuantizedShardedToAll"
    # four ranks, two KV heads: each rank computes the KV head its query heads read
    four = _sharded_run(model_dir, "cfg,tensor", 4)
    assert four["ar_relative"] < 1e-5 and four["ar_kv_heads_per_rank"] == 1
    assert four["dit_layer"] == "ShardedToAll" and four["image_max_pixel"] <= 2


def test_tensor_needs_a_group_that_splits_the_heads(model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlx_glm_image.generate", "-m", str(model_dir), "--prompt", "x",
                           "--parallel", "tensor", "--output", str(tmp_path / "x.png")], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --parallel needs several processes")
    # the tiny DiT has 2 heads
    code, out, err = launch("-m", model_dir, "--prompt", "x", *ARGS, "--parallel", "tensor", "--output", tmp_path / "x.png",
                            n=4)
    assert "--parallel tensor splits the DiT over 4 ranks, but its attention heads (2) is not a multiple of 4" in out + err
    assert re.search(r"rank \d exited with code 1\b", out + err) and "Traceback" not in out + err
    assert "loaded" not in out + err, "refused before any model is read"
    # the tiny AR model's MLP (192 wide) splits in two shares of 96: not whole groups of 64
    code, out, err = launch("-m", model_dir, "--prompt", "x", *ARGS, "-q", "4", "--parallel", "tensor",
                            "--output", tmp_path / "x.png")
    assert "down_proj: a share of 96 inputs does not hold whole quantization groups of 64" in out + err
    assert "Traceback" not in out + err and not (tmp_path / "x.png").exists()
