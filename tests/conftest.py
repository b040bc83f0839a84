"""Shared test helpers: seeded tiny models, torch <-> MLX conversion, one relative-error measure, and the tiny
checkpoints of tests/tiny_checkpoints.py, each written once for the session.

The fast tier (tests/fast) runs without the references (torch, diffusers, transformers): nothing here needs them
until a fixture that writes a checkpoint runs (tiny_checkpoints imports torch).
"""

import shutil
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

try:
    import torch
except ImportError:  # the fast tier alone, in an environment without the test references
    torch = None
else:
    torch.set_num_threads(2)

# A suite started in the background (a script's `cmd &`, nohup) has SIGINT or SIGHUP ignored, and a command inherits
# an ignore and keeps it (cli.interrupting). The tests that signal a command start it as a terminal does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def to_mx(t, dtype=None):
    """A torch tensor (or numpy array) as an MLX array, keeping the dtype unless one is asked."""
    if torch is not None and isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        t = t.numpy()
    a = mx.array(t)
    return a.astype(dtype) if dtype is not None else a


def to_np(x):
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32)) if x.dtype in (mx.bfloat16, mx.float16) else np.array(x)
    return np.asarray(x)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the project's one parity measure."""
    a, e = to_np(actual).astype(np.float64), to_np(expected).astype(np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != reference {e.shape}"
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


def assert_close(actual, expected, tol=1e-4, what="output"):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    return err


@pytest.fixture
def monkeypatch(monkeypatch):
    """pytest's monkeypatch, refusing attributes of MLX modules: a module keeps dict, list and array attributes as
    its own items, not in ``__dict__``, and pytest >= 9.2 restores from ``__dict__``, so its undo would delete
    them. Set and restore those by hand."""
    import mlx.nn as nn

    real = monkeypatch.setattr

    def setattr(target, *args, **kwargs):
        if isinstance(target, nn.Module):
            raise TypeError(f"do not monkeypatch an attribute of the MLX module {type(target).__name__}: set and "
                            "restore it by hand (see conftest.monkeypatch)")
        return real(target, *args, **kwargs)

    monkeypatch.setattr = setattr
    return monkeypatch


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The tiny pipeline (the diffusion side and the AR side, as zai-org/GLM-Image lays them out). Every test reads
    this one folder: one that changes the folder takes ``model_copy``."""
    from tiny_checkpoints import write_pipeline

    return write_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-glm-image")


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    """A copy of the tiny pipeline in the test's own folder, to change."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


@pytest.fixture(scope="session")
def diffusion_side(tmp_path_factory):
    """The diffusion side alone (a 40-code DiT, no AR model): (folder, diffusers' pipeline of the same modules)."""
    from tiny_checkpoints import write_diffusion_side

    folder = tmp_path_factory.mktemp("diffusion-side") / "tiny-glm-image"
    return folder, write_diffusion_side(folder)


@pytest.fixture(scope="session")
def transformer_only(tmp_path_factory) -> Path:
    """A DiT-only pipeline folder, its transformer/ in several shards: what the converter's tests read."""
    from tiny_checkpoints import write_transformer_only

    return write_transformer_only(tmp_path_factory.mktemp("transformer-only") / "glm-image")


@pytest.fixture(autouse=True)
def _seed():
    if torch is not None:
        torch.manual_seed(0)
    np.random.seed(0)
    mx.random.seed(0)
