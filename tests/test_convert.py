"""convert.py: a diffusers checkpoint written by save_pretrained -> MLX folder, fp32 and quantized."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from commands import run, start
from conftest import assert_close, rel_err, to_mx
from safetensors.torch import load_file, save_file

from diffusers import GlmImageTransformer2DModel as TorchDiT

from mlx_glm_image import GlmImageTransformer2DModel, load_model
from mlx_glm_image.convert import convert
from mlx_glm_image.loading import read_safetensors_header


@pytest.fixture(scope="module")
def source(transformer_only):
    """The DiT-only folder and diffusers' DiT read from it (the reference)."""
    assert len(list((transformer_only / "transformer").glob("*.safetensors"))) >= 3
    return transformer_only, TorchDiT.from_pretrained(transformer_only / "transformer").eval()


def dit_inputs(batch=2, h=8, w=12, text=5):
    g = torch.Generator().manual_seed(1)
    n = (h // 2) * (w // 2)
    return dict(
        hidden_states=torch.randn(batch, 4, h, w, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 64, generator=g),
        prior_token_id=torch.randint(0, 64, (batch, n), generator=g),
        prior_token_drop=torch.zeros(batch, n, dtype=torch.bool),
        timestep=torch.tensor([900.0, 20.0][:batch]),
        target_size=torch.tensor([[h * 8.0, w * 8.0]] * batch),
        crop_coords=torch.zeros(batch, 2),
    )


def forward(model, kw):
    return model(**{k: to_mx(v) for k, v in kw.items()}, return_dict=False)[0]


def reference(dit, kw):
    with torch.no_grad():
        return dit(**kw, return_dict=False)[0]


def test_fp32_conversion_matches_diffusers(source, tmp_path):
    src, dit = source
    convert(str(src), tmp_path / "out", verbose=False)
    out = tmp_path / "out"
    assert (out / "transformer" / "model.safetensors.index.json").exists()
    assert (out / "scheduler" / "scheduler_config.json").exists() and (out / "model_index.json").exists()
    assert "quantization" not in json.loads((out / "transformer" / "config.json").read_text())
    model = load_model(GlmImageTransformer2DModel, out / "transformer")
    kw = dit_inputs()
    assert_close(forward(model, kw), reference(dit, kw), 1e-4)


# measured on this tiny model: 8-bit ~3e-3, 4-bit ~5e-2 relative to the fp32 reference
@pytest.mark.parametrize("bits,group,bound", [(8, 64, 0.01), (4, 64, 0.1), (4, 32, 0.1)])
def test_quantized_conversion_loads_back_exactly(source, tmp_path, bits, group, bound):
    src, dit = source
    out = tmp_path / f"q{bits}"
    convert(str(src), out, quantize=True, q_bits=bits, q_group_size=group, verbose=False)
    config = json.loads((out / "transformer" / "config.json").read_text())
    q = config["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (bits, group, "affine")
    assert q["proj_out"] is False and q["time_condition_embed.timestep_embedder.linear_1"] is False

    kw = dit_inputs()
    a = forward(load_model(GlmImageTransformer2DModel, out / "transformer"), kw)
    model = load_model(GlmImageTransformer2DModel, out / "transformer")
    b = forward(model, kw)
    assert np.array_equal(np.array(a), np.array(b)), "two loads of the same files must agree bit for bit"
    assert type(model.transformer_blocks[0].attn1.to_q).__name__ == "QuantizedLinear"
    assert type(model.proj_out).__name__ == "Linear"
    err = rel_err(b, reference(dit, kw))
    assert 0 < err < bound, f"{bits}-bit error {err:.2e}"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_size_in_proportion_to_bits(source, tmp_path, bits):
    """Quantized layers shrink to bits/32 plus one fp32 scale and bias per group of 64 (fp32 source)."""
    src, _ = source
    out = tmp_path / f"size{bits}"
    convert(str(src), out, quantize=True, q_bits=bits, verbose=False)
    q_layers = set()
    src_bytes = out_bytes = 0
    src_headers = {}
    for f in (src / "transformer").glob("*.safetensors"):
        src_headers.update(read_safetensors_header(f))
    out_headers = {}
    for f in (out / "transformer").glob("*.safetensors"):
        out_headers.update(read_safetensors_header(f))
    for key, info in out_headers.items():
        if key.endswith(".scales"):
            layer = key[: -len(".scales")]
            q_layers.add(layer)
            n = np.prod(src_headers[f"{layer}.weight"]["shape"])
            src_bytes += n * 4
            for leaf in ("weight", "scales", "biases"):
                s, e = out_headers[f"{layer}.{leaf}"]["data_offsets"]
                out_bytes += e - s
    ratio = out_bytes / src_bytes
    expected = bits / 32 + 2 / 64  # fp32 scale + bias per 64 weights
    assert len(q_layers) == 3 * 7 + 4  # per block: q, k, v, out, ff in/out, adaLN; + glyph & prior projectors (2 each)
    assert abs(ratio - expected) < 1e-3, (ratio, expected)
    folder_ratio = sum(f.stat().st_size for f in (out / "transformer").glob("*.safetensors")) / sum(
        f.stat().st_size for f in (src / "transformer").glob("*.safetensors")
    )
    assert folder_ratio < (0.35 if bits == 8 else 0.25)


def test_dry_run_plans_the_real_sizes(source, tmp_path):
    src, _ = source
    planned = convert(str(src), tmp_path / "never", quantize=True, q_bits=4, dry_run=True, verbose=False)
    assert not (tmp_path / "never").exists()
    actual = convert(str(src), tmp_path / "real", quantize=True, q_bits=4, verbose=False)
    (name, _, after), (_, _, real_after) = planned[0], actual[0]
    assert name == "transformer"
    # file sizes add the safetensors headers (a few KB) to the tensor bytes the plan counts
    assert after <= real_after < after * 1.02 + 20_000


def test_streaming_keeps_peak_memory_near_one_shard(source, tmp_path):
    src, _ = source
    total = sum(f.stat().st_size for f in (src / "transformer").glob("*.safetensors"))
    mx.clear_cache()
    mx.reset_peak_memory()
    convert(str(src), tmp_path / "stream", shard_bytes=150_000, verbose=False)
    assert len(list((tmp_path / "stream" / "transformer").glob("*.safetensors"))) >= 3
    assert mx.get_peak_memory() < 0.6 * total, (mx.get_peak_memory(), total)


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_other_quantization_modes_load_back(source, tmp_path, mode):
    src, dit = source
    out = tmp_path / mode
    convert(str(src), out, quantize=True, q_mode=mode, verbose=False)
    model = load_model(GlmImageTransformer2DModel, out / "transformer")
    assert model.transformer_blocks[0].attn1.to_q.mode == mode
    kw = dit_inputs()
    assert rel_err(forward(model, kw), reference(dit, kw)) < 0.15


def test_dtype_cast(source, tmp_path):
    src, dit = source
    convert(str(src), tmp_path / "bf16", dtype="bfloat16", verbose=False)
    model = load_model(GlmImageTransformer2DModel, tmp_path / "bf16" / "transformer")
    assert model.dtype == mx.bfloat16
    kw = dit_inputs()
    assert rel_err(forward(model, kw), reference(dit, kw)) < 0.03


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 1, no traceback, nothing half-written, an existing DST untouched.


def assert_clean_failure(proc, message, parent: Path):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not [p for p in parent.iterdir() if "partial" in p.name], "temporary output left behind"


def copy_source(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def shard_of(folder: Path, key: str) -> Path:
    index = json.loads(next(folder.glob("*.index.json")).read_text())
    return folder / index["weight_map"][key]


def test_missing_source(tmp_path):
    proc = run("convert.py", "--hf-path", tmp_path / "nope", "--mlx-path", tmp_path / "out")
    assert_clean_failure(proc, "does not exist", tmp_path)
    assert not (tmp_path / "out").exists()


def test_truncated_shard(source, tmp_path):
    src = copy_source(source[0], tmp_path / "src")
    shard = sorted((src / "transformer").glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    assert_clean_failure(run("convert.py", "--hf-path", src, "--mlx-path", tmp_path / "out"), "truncated", tmp_path)
    assert not (tmp_path / "out").exists()


def test_corrupt_shard(source, tmp_path):
    src = copy_source(source[0], tmp_path / "src")
    shard = sorted((src / "transformer").glob("*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    proc = run("convert.py", "--hf-path", src, "--mlx-path", tmp_path / "out")
    assert_clean_failure(proc, "not a valid safetensors file", tmp_path)


@pytest.mark.parametrize("edit,message", [
    ("drop", "missing weights proj_out.bias"),
    ("add", "unexpected weight extra.weight"),
    ("reshape", "weight proj_out.bias has shape (3,), the model expects (16,)"),
])
def test_wrong_keys_and_shapes(source, tmp_path, edit, message):
    src = copy_source(source[0], tmp_path / "src")
    shard = shard_of(src / "transformer", "proj_out.bias")
    tensors = load_file(shard)
    if edit == "drop":
        del tensors["proj_out.bias"]
    elif edit == "add":
        tensors["extra.weight"] = torch.zeros(2)
    else:
        tensors["proj_out.bias"] = torch.zeros(3)
    save_file(tensors, shard)
    assert_clean_failure(run("convert.py", "--hf-path", src, "--mlx-path", tmp_path / "out"), message, tmp_path)
    assert not (tmp_path / "out").exists()


def test_existing_destination_needs_force(source, tmp_path):
    src, dit = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    proc = run("convert.py", "--hf-path", src, "--mlx-path", out)
    assert_clean_failure(proc, "already exists; pass --force", tmp_path)
    assert (out / "mine.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1

    # a failing --force run leaves the old folder as it was
    bad = copy_source(src, tmp_path / "bad")
    shard = sorted((bad / "transformer").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert_clean_failure(run("convert.py", "--hf-path", bad, "--mlx-path", out, "--force"), "truncated", tmp_path)
    assert (out / "mine.txt").read_text() == "keep me"

    proc = run("convert.py", "--hf-path", src, "--mlx-path", out, "--force", "-q", "--q-bits", "8")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "mine.txt").exists() and (out / "transformer" / "config.json").exists()
    assert "transformer" in proc.stdout and "total" in proc.stdout
    model = load_model(GlmImageTransformer2DModel, out / "transformer")
    kw = dit_inputs()
    assert rel_err(forward(model, kw), reference(dit, kw)) < 0.01


def test_bad_quantization_arguments(source, tmp_path):
    src, _ = source
    proc = run("convert.py", "--hf-path", src, "--mlx-path", tmp_path / "o", "-q", "--q-mode", "nvfp4", "--q-bits", "8")
    assert_clean_failure(proc, "mode nvfp4 takes bits [4]", tmp_path)
    proc = run("convert.py", "--hf-path", src, "--mlx-path", tmp_path / "o", "--components", "unet")
    assert_clean_failure(proc, "unknown component 'unet'", tmp_path)


def test_hub_repo_id_fetches_only_the_needed_files(source, tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download with patterns for the components asked."""
    import fnmatch
    import shutil

    import huggingface_hub

    src, dit = source
    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked["repo"], asked["patterns"] = repo_id, allow_patterns
        cache = tmp_path / "hub-cache"
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (cache / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, cache / rel)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert("zai-org/GLM-Image", tmp_path / "out", components=["transformer"], verbose=False)
    assert asked["repo"] == "zai-org/GLM-Image"
    assert "transformer/*" in asked["patterns"] and not any(p.startswith("vae") for p in asked["patterns"])
    model = load_model(GlmImageTransformer2DModel, tmp_path / "out" / "transformer")
    kw = dit_inputs()
    assert_close(forward(model, kw), reference(dit, kw), 1e-4)


def test_an_mlx_folder_is_not_converted_again(source, tmp_path):
    src, _ = source
    convert(str(src), tmp_path / "once", verbose=False)
    proc = run("convert.py", "--hf-path", tmp_path / "once", "--mlx-path", tmp_path / "twice")
    assert_clean_failure(proc, "already an MLX conversion", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# The converter cannot destroy or waste


def tree_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_destination_is_never_the_source(source, tmp_path, where):
    src = copy_source(source[0], tmp_path / "src")
    before = tree_bytes(src)
    dst = {"same": src, "inside": src / "mlx", "containing": tmp_path}[where]
    proc = run("convert.py", "--hf-path", src, "--mlx-path", dst, "-q", "--force")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --mlx-path {dst} is the source, inside it or contains it; choose another folder"]
    assert tree_bytes(src) == before, "the source is byte-identical"
    assert not (src / "mlx").exists()


def test_source_missing_a_listed_component_is_refused(source, tmp_path):
    src = copy_source(source[0], tmp_path / "src")
    index = json.loads((src / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (src / "model_index.json").write_text(json.dumps(index))
    proc = run("convert.py", "--hf-path", src, "--mlx-path", tmp_path / "out")
    assert_clean_failure(proc, "lacks vae/, which model_index.json lists", tmp_path)
    assert not (tmp_path / "out").exists()
    proc = run("convert.py", "--hf-path", src, "--mlx-path", tmp_path / "out", "--components", "transformer")
    assert proc.returncode == 0, proc.stderr


def test_not_enough_free_space(source, tmp_path, monkeypatch):
    import shutil

    from mlx_glm_image.conversion import ConvertError

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    with pytest.raises(ConvertError, match="has 1.0 KB free; the conversion needs"):
        convert(str(source[0]), tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_files_follow_the_umask(source, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        proc = run("convert.py", "--hf-path", source[0], "--mlx-path", tmp_path / "out", "-q")
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    paths = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    modes = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()}
    dir_modes = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()}
    assert modes == {0o644} and dir_modes == {0o755}, (modes, dir_modes)


def test_sigterm_and_sighup_leave_no_partial_folder(source, tmp_path):
    """Signals at several moments: before the output exists, while it is being written, (maybe) after. Each
    run either completes or leaves nothing: no partial folder, no destination, and what it says matches."""
    import signal
    import time

    seen_partial = 0
    for i, (sig, delay) in enumerate([(signal.SIGTERM, 0.0), (signal.SIGTERM, 0.5), (signal.SIGHUP, None),
                                      (signal.SIGTERM, None), (signal.SIGTERM, 1.5)]):
        parent = tmp_path / f"run{i}"
        parent.mkdir()
        proc = start("convert.py", "--hf-path", source[0], "--mlx-path", parent / "out", "--shard-size-gb", "0.00002")
        if delay is None:  # the moment the temporary folder appears
            deadline = time.time() + 30
            while not list(parent.glob(".*.partial")) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.002)
            seen_partial += bool(list(parent.glob(".*.partial")))
        else:
            time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        assert not list(parent.glob(".*.partial")), f"run {i}: partial folder left"
        out = parent / "out"
        if out.exists():  # it completed (a signal after the swap, even at the interpreter's exit, leaves it so)
            assert (out / "model_index.json").exists(), f"run {i}: a half-written destination ({err})"
            assert "nothing was written" not in err, err
        else:
            assert proc.returncode != 0 and "is complete" not in err, err
    assert seen_partial, "no signal arrived while the output was being written"


@pytest.mark.parametrize("moment", ["making the folder", "swapping folders"])
def test_a_signal_another_thread_takes_waits_for_the_block(source, tmp_path, monkeypatch, capsys, moment):
    """The kernel may hand a signal to any thread that does not block it (MLX and tqdm run threads); Python then
    runs the handler in the main thread. Arriving while the temporary folder is made, or while --force swaps the
    folders, it waits for the step to end: no partial folder, and the destination is the old one or the new one,
    whole."""
    import os
    import signal
    import threading
    import time

    from mlx_glm_image import convert as C

    out = tmp_path / "out"
    if moment == "swapping folders":
        assert C.main(["--hf-path", str(source[0]), "--mlx-path", str(out)]) == 0
    helper = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
    helper.start()

    def signal_elsewhere():
        signal.pthread_kill(helper.ident, signal.SIGTERM)
        time.sleep(0.05)  # the main thread meets the handler at its next bytecode

    real_mkdir, real_rename = os.mkdir, Path.rename
    if moment == "making the folder":
        def mkdir(path, *a, **k):
            real_mkdir(path, *a, **k)
            if str(path).endswith(".partial"):
                signal_elsewhere()
        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        def rename(self, target):
            moved = real_rename(self, target)
            if str(target).endswith(".old"):
                signal_elsewhere()
            return moved
        monkeypatch.setattr(Path, "rename", rename)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = C.main(["--hf-path", str(source[0]), "--mlx-path", str(out), "--force"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == 130
    assert not list(tmp_path.glob(".*.partial")) and not list(tmp_path.glob(".*.old"))
    said = capsys.readouterr().err.strip().splitlines()[-1]
    if moment == "making the folder":
        assert not out.exists() and said == "interrupted; nothing was written"
    else:
        assert said == f"interrupted; the conversion had finished: {out} is complete"
        assert json.loads((out / "model_index.json").read_text())["_mlx_glm_image"]
        load_model(GlmImageTransformer2DModel, out / "transformer")


def test_stale_partial_of_a_killed_run_is_removed(source, tmp_path):
    """A temporary folder's name carries its writer's process id (atomic.py)."""
    stale = tmp_path / ".out.999999999.abc123.partial"  # no such process
    (stale / "transformer").mkdir(parents=True)
    alive = tmp_path / f".out.{__import__('os').getpid()}.def456.partial"  # a conversion still running
    alive.mkdir()
    proc = run("convert.py", "--hf-path", source[0], "--mlx-path", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and alive.exists()
    assert f"removed {stale}" in proc.stderr
