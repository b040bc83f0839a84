"""``mlx-glm-image --check`` on a tiny local checkpoint, a converted one, a Hub listing (faked), the Hub cache, and
the default repo with the Hub offline or silent: its figures, its exit code, its one-line errors."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from commands import cli
from mlx.utils import tree_flatten
from safetensors import safe_open

from mlx_glm_image import loading, preflight as P
from mlx_glm_image.loading import load_model
from mlx_glm_image.conversion import human
from mlx_glm_image.convert import convert
from mlx_glm_image.pipeline.components import MODELS, RESIDENT_SHARE

def check(*args, hf_home, **env):
    """``--check`` in a subprocess with its own (empty) Hub cache; (process, seconds)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ.update(HF_HOME=str(hf_home), **env)
    t0 = time.perf_counter()
    proc = cli("--check", *args, env=environ, timeout=120)
    return proc, time.perf_counter() - t0


def tensor_bytes(folder: Path) -> int:
    """Bytes of a component's tensors, from its safetensors files (another reader than the converter's)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            total += sum(st.get_tensor(k).nbytes for k in st.keys())
    return total


def test_tiny_local_folder_fits(model_dir, tmp_path):
    proc, _ = check("-m", model_dir, hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert proc.stderr == ""
    resident = sum(tensor_bytes(model_dir / n) for n in MODELS)
    staged = max(tensor_bytes(model_dir / "vision_language_encoder"), tensor_bytes(model_dir / "text_encoder"),
                 tensor_bytes(model_dir / "transformer") + tensor_bytes(model_dir / "vae"))
    lines = {line.split()[0].rstrip(":"): line for line in out.splitlines() if line.strip()}
    assert f"{human(resident)} fits" in lines["resident"] and f"{human(staged)} fits" in lines["staged"]
    assert lines["resident"].split()[4:6] == human(resident).split()  # the no -q column comes first
    for name in MODELS:
        assert human(tensor_bytes(model_dir / name)) in lines[name], lines[name]
    assert "no -q" in lines["weights"] and "-q 8" in lines["weights"] and "-q 4" in lines["weights"]
    assert lines["download"].split()[1] == "none" and "convert -q 4" in out
    assert "HF_HUB_OFFLINE" in lines["Hugging"] and "a local folder needs none" in lines["Hugging"]
    # (the budget is the memory available now: it moves between two reads, so only the weights are compared)
    assert lines["verdict"].startswith(f"verdict         can run: --memory resident ({human(resident)} of weights at once")
    assert len(out.splitlines()) <= 24, "one screen"


def test_quantized_figures_are_what_loading_holds(model_dir, monkeypatch):
    """-q 8 / -q 4 figures equal the bytes of the models quantized at load time (at the files' dtype)."""
    monkeypatch.setattr(P, "ask_hub", lambda repo, files: ("offline", "not asked", None))
    facts = P.gather(str(model_dir), bits=3)
    assert not facts.converted and facts.source == "a local folder" and facts.download == 0
    for name, cls in MODELS.items():
        for bits in (None, 8, 4, 3):
            model = load_model(cls, model_dir, dtype=None, quantize=bits)
            held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
            assert facts.weights[name][bits] == held, (name, bits)
        # the estimate from the config alone (the Hub's and the released figures' path) agrees
        est = P.estimate(cls, loading.read_config(model_dir / name), facts.weights[name][None], (None, 8, 4, 3))
        assert est == facts.weights[name], name
    assert facts.weights["transformer"][4] < facts.weights["transformer"][None]
    assert facts.weights["vae"][4] == facts.weights["vae"][None], "the VAE is not quantized by -q"
    assert [c[0] for c in facts.conversions] == [8, 4, 3]
    assert facts.conversions[1][1] == sum(facts.weights[n][4] for n in MODELS) + sum(
        P.folder_bytes(model_dir / c) for c in ("processor", "tokenizer", "scheduler"))


def test_a_tiny_budget_is_exit_1_with_the_reason(model_dir, monkeypatch):
    import dataclasses

    monkeypatch.setattr(P, "ask_hub", lambda repo, files: ("offline", "not asked", None))
    facts = P.gather(str(model_dir))
    resident = P.peaks({n: s[None] for n, s in facts.weights.items()})["resident"]
    smallest = P.peaks({n: s[4] for n, s in facts.weights.items()})["staged"]
    just_below = dataclasses.replace(facts, budget=int(resident / RESIDENT_SHARE) - 1)
    code, reason = P.verdict(just_below)
    assert code == 0 and reason.startswith("can run: --memory staged"), reason
    tiny = dataclasses.replace(facts, budget=int(smallest / RESIDENT_SHARE) - 1)
    code, reason = P.verdict(tiny)
    assert code == 1 and f"the smallest, -q 4 --memory staged, holds {human(smallest)} at once" in reason
    screen = P.render(tiny, reason).splitlines()
    rows = [line for line in screen if line.startswith(("  resident:", "  staged:"))]
    assert len(rows) == 2 and all(row.split().count("no") == 3 and "fits" not in row for row in rows)


def test_a_converted_folder_loads_as_stored(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "ask_hub", lambda repo, files: ("offline", "not asked", None))
    out = tmp_path / "q4"
    convert(str(model_dir), out, quantize=True, q_bits=4, verbose=False)
    facts = P.gather(str(out), bits=8)
    assert facts.converted and facts.conversions == []
    for name in MODELS:
        assert set(facts.weights[name].values()) == {loading.weight_bytes(out / name)}
    assert P.verdict(facts)[0] == 0
    assert "(converted: -q changes nothing)" in P.render(facts, "")


def test_hub_listing_sizes_download_and_cache(model_dir, monkeypatch):
    """The Hub's answer (faked from the tiny folder's files): sizes from the listing, configs fetched, the download
    less what the cache holds."""
    import huggingface_hub
    from huggingface_hub import constants

    files = {str(f.relative_to(model_dir)): f.stat().st_size for f in model_dir.rglob("*") if f.is_file()}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(P, "hub_listing", lambda repo, with_files: ("abc123", dict(files) if with_files else {}))
    monkeypatch.setattr(P, "hub_configs", lambda repo, sha, names: {n: loading.read_config(model_dir / n) for n in names})
    cached = "transformer/config.json"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, f, revision=None, **kw: "/x" if f == cached and revision == "abc123" else None)
    facts = P.gather("org/tiny")
    assert facts.hub.startswith("the Hub answered in") and facts.reachable
    assert facts.download == sum(files.values()) - files[cached]
    assert facts.source == f"the Hub's file listing ({human(files[cached])} of it in the Hub cache)"
    for name in MODELS:
        stored = sum(s for f, s in files.items() if f.startswith(name + "/") and f.endswith(".safetensors"))
        assert facts.weights[name][None] == stored
    assert facts.weights["transformer"][4] < facts.weights["transformer"][8] < facts.weights["transformer"][None]
    code, reason = P.verdict(facts)
    assert code == 0 and reason.endswith(f"after a download of {human(facts.download)}")
    # a repo without the pipeline's folders is one line
    monkeypatch.setattr(P, "hub_listing", lambda repo, with_files: ("abc", {"README.md": 1, "transformer/x": 1}))
    with pytest.raises(loading.WeightsError, match="org/tiny lacks vision_language_encoder/, processor/, "):
        P.gather("org/tiny")


def test_a_complete_hub_cache_runs_offline(model_dir, tmp_path):
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    proc, _ = check("-m", "org/tiny", hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"org/tiny: the Hub cache ({repo / 'snapshots' / 'abc123'})" in proc.stdout
    assert "download                none" in proc.stdout


def test_default_repo_offline_uses_the_released_figures(tmp_path):
    proc, seconds = check(hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert "zai-org/GLM-Image: the released checkpoint's figures" in lines["model"]
    assert "the Hub was not asked (offline: HF_HUB_OFFLINE is set)" in lines["Hugging"]
    assert lines["transformer"].split()[1:] == ["13.9", "GB", "7.4", "GB", "4.0", "GB"]
    assert lines["vision_language_encoder"].split()[1:] == ["20.2", "GB", "10.8", "GB", "5.8", "GB"]
    assert lines["resident:"].split()[4:6] == ["35.8", "GB"]
    assert f"35.8 GB into {tmp_path / 'hf' / 'hub'}" in lines["download"]
    assert lines["verdict"].startswith("verdict         cannot run yet: the Hub was not asked (offline: HF_HUB_OFFLINE "
                                       "is set), and zai-org/GLM-Image is not in the Hub cache (35.8 GB to download)")
    assert seconds < 60


def test_a_silent_hub_does_not_hang(tmp_path):
    """A server that accepts and never answers: the check gives up after its short timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc, seconds = check("-q", "4", hf_home=tmp_path / "hf", HF_ENDPOINT=endpoint)
    finally:
        server.close()
        for c in held:
            c.close()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"the Hub did not answer (no answer within {P.HUB_TIMEOUT + 1:.0f} s) at {endpoint}" in proc.stdout
    assert "released checkpoint's figures" in proc.stdout
    assert seconds < P.HUB_TIMEOUT + 30, seconds


@pytest.mark.parametrize("model, message", [
    ("/no/such/folder", "error: /no/such/folder does not exist"),
    ("no-such-model", "error: no-such-model does not exist (expected a local folder or a Hugging Face repo id like "
                      "org/name)"),
])
def test_a_bad_model_is_one_line(model, message, tmp_path):
    proc, _ = check("-m", model, hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr == message + "\n"


def test_a_folder_without_weights_is_one_line(model_copy, tmp_path):
    for f in (model_copy / "vae").glob("*.safetensors"):
        f.unlink()
    proc, _ = check("-m", model_copy, hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"error: no .safetensors weights in {model_copy / 'vae'}\n"
