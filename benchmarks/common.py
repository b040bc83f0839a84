"""What the benchmark scripts share: the OpenBLAS preload rule, the worker protocol, the released configs.

Worker protocol: a script re-runs itself as ``python <script> --worker <side> [--src <checkout>] <args...>`` in a
subprocess (``run_worker``), so that each side's time and peak memory are its own; the worker prints one line
``RESULT <json>`` (``report``) and the parent reads it back. The parent's inputs a worker must not take from its own
checkout (the configs to build, when ``--src`` times another checkout) travel as ``--inputs <json>``.

Configs: each component's released config.json, from the package's table of them (``models/released.py``,
docs/checkpoint.md). Field names are diffusers'/transformers' keyword names, so
``reference_kwargs`` makes the torch side's arguments from the same dict. Nothing here imports the package at import time: a worker puts ``--src`` on
``sys.path`` first (``use_checkout``).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# MLX's CPU wheel ships a slow reference BLAS; a system OpenBLAS preloaded into the MLX process replaces it. Never
# into a process that times torch: its threads spin next to torch's and slow it down.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
RESULT = "RESULT "


# ---- the OpenBLAS rule and the worker protocol ---------------------------------------------------------------
def default_device() -> str:
    """"gpu" where MLX has one (Metal, CUDA), else "cpu": for scripts without a --device flag."""
    import mlx.core as mx

    return "gpu" if mx.is_available(mx.gpu) else "cpu"


def worker_env(mlx: bool, device: str = "cpu", openblas: bool = True) -> dict:
    """The environment of a worker: OpenBLAS preloaded into an MLX process on the CPU when the library exists,
    LD_PRELOAD removed for every other (a torch process never gets it)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if mlx and device == "cpu" and openblas and Path(OPENBLAS).exists():
        env["LD_PRELOAD"] = OPENBLAS
    return env


def run_worker(script, side: str, argv=(), *, mlx: bool, device: str = "cpu", src=None, inputs=None,
               timeout: float | None = None, openblas: bool = True, launcher=(), cwd=None, label: str | None = None):
    """Run ``python <script> --worker <side> [--src <src>] <argv...> [--inputs <json>]`` (under ``launcher``, e.g.
    ``mlx.launch ... --``) and return the JSON result it printed, or None after saying on stderr why there is
    none (timeout, non-zero exit, no result line). ``mlx``: the worker times MLX (the OpenBLAS rule)."""
    cmd = [*launcher, sys.executable, str(script), "--worker", side]
    cmd += ["--src", str(Path(src).resolve())] if src is not None else []  # the worker's cwd may differ
    cmd += [str(a) for a in argv]
    cmd += ["--inputs", json.dumps(inputs)] if inputs is not None else []
    label = label or side
    print(f"running {label} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, env=worker_env(mlx, device, openblas), capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        print(f"{label}: timed out after {timeout} s", file=sys.stderr, flush=True)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        print(f"{label} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(lines[-1][len(RESULT):])


def report(result):
    """The worker's side of the protocol: its one result line."""
    print(RESULT + json.dumps(result), flush=True)


def use_checkout(src=None):
    """Import ``mlx_glm_image`` from ``src`` (default: this checkout): call before the package is first imported."""
    sys.path.insert(0, str(Path(src) if src is not None else ROOT))


def add_worker_arguments(parser, sides):
    """The hidden arguments of the worker protocol (``--src`` is each script's own, where it has one)."""
    import argparse

    parser.add_argument("--worker", choices=list(sides), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=json.loads, help=argparse.SUPPRESS)


# ---- configs ----------------------------------------------------------------------------------------------
# smaller configs the scripts share, as changes to the released one: same vocabularies and head geometry
_AR_REDUCED = dict(  # fewer and narrower layers (bench_prior, bench_pipeline)
    text_config=dict(hidden_size=1024, intermediate_size=3424, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2),
    vision_config=dict(depth=2, hidden_size=256, num_heads=4, intermediate_size=1024),
    vq_config=dict(latent_channels=256, embed_dim=256))
SMALLER = {
    # 1/4 of the DiT's width (8 heads x 128), 4 layers: runs on a laptop CPU (bench_transformer, bench_parallel)
    ("transformer", "reduced"): dict(num_layers=4, num_attention_heads=8),
    ("vision_language_encoder", "reduced"): _AR_REDUCED,
    # the released 40 layers, vocabularies and attention geometry at width 256: the weights are small, so the
    # per-token overhead (the host issuing a step, the kernels it launches) sets the pace, as on a fast GPU
    ("vision_language_encoder", "narrow"): {**_AR_REDUCED, "text_config": dict(
        _AR_REDUCED["text_config"], hidden_size=256, intermediate_size=512, num_hidden_layers=40,
        num_attention_heads=2)},
}


def write_component(model, folder, config: dict):
    """A model's weights and config.json as a component folder the loaders read (random weights, for timing)."""
    import json
    from pathlib import Path

    import mlx.core as mx
    from mlx.utils import tree_flatten

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))


def random_denoise_inputs(dit, size: int, text_len: int = 64):
    """(DenoiseInputs, noise latents) of random values for one ``size`` x ``size`` image of ``dit`` (its text
    ``text_len`` tokens, the negative one token), and the released schedule's sampler for 50 steps at that size."""
    import mlx.core as mx
    import numpy as np

    from mlx_glm_image.pipeline.denoise import DenoiseInputs
    from mlx_glm_image.pipeline.flow import FlowMatchEulerSampler
    from mlx_glm_image.scheduler import SchedulerConfig

    c = dit.config
    rng = np.random.default_rng(0)
    lat, n = size // 8, (size // 16) ** 2
    text = mx.array(rng.standard_normal((1, text_len, c.text_embed_dim)).astype(np.float32))
    inputs = DenoiseInputs(prompt_embeds=text, negative_prompt_embeds=text[:, :1],
                           prior_token_ids=mx.array(rng.integers(0, c.prior_vq_quantizer_codebook_size, (1, n)), mx.int32),
                           target_size=mx.array([[size, size]], mx.float32), crop_coords=mx.zeros((1, 2)))
    x = mx.array(rng.standard_normal((1, c.in_channels, lat, lat)).astype(np.float32))
    sampler = FlowMatchEulerSampler(SchedulerConfig.from_dict(released("scheduler")), image_seq_len=n)
    return inputs, x, sampler


def released(component: str) -> dict:
    """The released ``<component>/config.json`` (component: a folder name of ``mlx_glm_image.models.released``)."""
    from mlx_glm_image.models import released as configs

    return configs.config(component)


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied, nested dicts merged key by key (a copy; neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config(component: str, variant: str = "released") -> dict:
    """The released config, or one of the shared smaller ones (``SMALLER``)."""
    cfg = released(component)
    return cfg if variant == "released" else merged(cfg, SMALLER[(component, variant)])


def variants(component: str) -> list[str]:
    """The names ``config`` takes for ``component``."""
    return ["released"] + [v for (c, v) in SMALLER if c == component]


def reference_kwargs(cfg: dict, reference) -> dict:
    """``cfg`` as keyword arguments of the reference class (diffusers' model, transformers' config): the keys its
    ``__init__`` names."""
    params = inspect.signature(reference.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(cfg)
    return {k: v for k, v in cfg.items() if k in params}
