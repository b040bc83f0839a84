"""Scheduler parity with diffusers 0.42.1: GlmImagePipeline's schedule and its Euler + CFG loop."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import assert_close

from mlx_glm_image.pipeline.denoise import classifier_free_guidance
from mlx_glm_image.scheduler import FlowMatchEulerDiscreteScheduler, calculate_shift

from diffusers import FlowMatchEulerDiscreteScheduler as RefScheduler  # noqa: E402
from diffusers.pipelines.glm_image import pipeline_glm_image as ref_pipe  # noqa: E402

# The released checkpoint's scheduler/scheduler_config.json (docs/checkpoint.md).
RELEASED = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.37.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.25,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 0.75,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "linear",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def seq_len(height, width, vae_scale_factor=8, patch_size=2):
    return ((height // vae_scale_factor) * (width // vae_scale_factor)) // (patch_size**2)


def reference_schedule(config, num_inference_steps, height, width, timesteps=None, sigmas=None):
    """Lines 958-977 of GlmImagePipeline.__call__ (diffusers 0.42.1), verbatim but for `self.`."""
    scheduler = RefScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    image_seq_len = seq_len(height, width)
    timesteps = (
        np.linspace(scheduler.config.num_train_timesteps, 1.0, num_inference_steps + 1)[:-1]
        if timesteps is None
        else np.array(timesteps)
    )
    timesteps = timesteps.astype(np.int64).astype(np.float32)
    sigmas = timesteps / scheduler.config.num_train_timesteps if sigmas is None else sigmas
    mu = ref_pipe.calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("base_shift", 0.25),
        scheduler.config.get("max_shift", 0.75),
    )
    timesteps, num_inference_steps = ref_pipe.retrieve_timesteps(
        scheduler, num_inference_steps, "cpu", timesteps, sigmas, mu=mu
    )
    return scheduler, timesteps


def ours(config, num_inference_steps, height, width, timesteps=None, sigmas=None):
    s = FlowMatchEulerDiscreteScheduler(config)
    s.set_timesteps(num_inference_steps, image_seq_len=seq_len(height, width), timesteps=timesteps, sigmas=sigmas)
    return s


def test_calculate_shift_matches_pipeline():
    for n in (16, 256, 1024, 4096, 16384, 6144):
        assert calculate_shift(n) == ref_pipe.calculate_shift(n)
    assert abs(calculate_shift(4096) - 3.25) < 1e-12


@pytest.mark.parametrize("steps", [1, 2, 7, 28, 50, 100])
@pytest.mark.parametrize("hw", [(1024, 1024), (512, 768), (2048, 2048), (1152, 896), (64, 96)])
def test_schedule_equals_pipeline(steps, hw):
    ref, ref_t = reference_schedule(RELEASED, steps, *hw)
    s = ours(RELEASED, steps, *hw)
    # bit-exact: the same float32 arithmetic in numpy
    np.testing.assert_array_equal(s.timesteps, ref_t.numpy())
    np.testing.assert_array_equal(s.sigmas, ref.sigmas.numpy())
    assert s.sigmas[-1] == 0.0 and len(s.sigmas) == steps + 1
    assert s.timesteps.dtype == np.float32 and s.sigmas.dtype == np.float32


def test_schedule_values_documented():
    # docs/checkpoint.md: mu = 3.25 at 1024x1024, s' = mu / (mu + 1/s - 1), timesteps unshifted, the DiT gets t - 1.
    s = ours(RELEASED, 50, 1024, 1024)
    assert s.timesteps[0] == 1000.0 and s.timesteps[1] == 980.0 and s.timesteps[-1] == 20.0
    sig = 0.98
    assert abs(s.sigmas[1] - 3.25 / (3.25 + 1 / sig - 1)) < 1e-6
    assert s.model_timestep(0) == 999.0


@pytest.mark.parametrize(
    "custom",
    [
        {"timesteps": [999.7, 900.2, 750, 500, 250, 10]},
        {"sigmas": [1.0, 0.8, 0.55, 0.3, 0.1, 0.02]},
        {"timesteps": [1000, 800, 600, 400, 200, 50], "sigmas": [0.99, 0.8, 0.6, 0.4, 0.2, 0.05]},
    ],
)
def test_custom_timesteps_and_sigmas(custom):
    steps = 6
    ref, ref_t = reference_schedule(RELEASED, steps, 768, 1024, **custom)
    s = ours(RELEASED, steps, 768, 1024, **custom)
    np.testing.assert_array_equal(s.timesteps, ref_t.numpy())
    np.testing.assert_array_equal(s.sigmas, ref.sigmas.numpy())


def test_other_configs():
    # exponential shift, karras, shift_terminal, invert: the scheduler flags beyond the released config
    for extra in (
        {"time_shift_type": "exponential"},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"shift_terminal": 0.1},
        {"invert_sigmas": True},
        {"use_dynamic_shifting": False, "shift": 3.0},
    ):
        cfg = {**RELEASED, **extra}
        ref, ref_t = reference_schedule(cfg, 12, 512, 512)
        s = ours(cfg, 12, 512, 512)
        np.testing.assert_allclose(s.timesteps, ref_t.numpy(), rtol=1e-6, err_msg=str(extra))
        np.testing.assert_allclose(s.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7, err_msg=str(extra))


def test_mismatched_lengths_raise():
    s = FlowMatchEulerDiscreteScheduler(RELEASED)
    with pytest.raises(ValueError):
        s.set_timesteps(3, image_seq_len=4096, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError):
        s.set_timesteps(3)  # no resolution
    with pytest.raises(ValueError):
        s.step(mx.zeros((1,)), 5, mx.zeros((1,)))


def test_from_pretrained(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**RELEASED, "unknown_key": 1}))
    for where in (tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json"):
        s = FlowMatchEulerDiscreteScheduler.from_pretrained(where)
        assert s.config.time_shift_type == "linear" and s.config.base_shift == 0.25
    # a config.json without a key reads as diffusers reads it (tests/test_config_defaults.py checks every field)
    d = FlowMatchEulerDiscreteScheduler({"num_train_timesteps": 1000}).config
    assert not d.use_dynamic_shifting and d.time_shift_type == "exponential" and d.max_shift == 1.15


@pytest.mark.parametrize("guidance_scale", [1.5, 4.0])
def test_euler_cfg_loop_equals_reference(guidance_scale):
    steps, (h, w) = 5, (256, 384)
    ref, ref_t = reference_schedule(RELEASED, steps, h, w)
    s = ours(RELEASED, steps, h, w)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, h // 8, w // 8, generator=g)
    vc = [torch.randn(latents.shape, generator=g) for _ in range(steps)]
    vu = [torch.randn(latents.shape, generator=g) for _ in range(steps)]

    x_ref = latents.clone()
    for i, t in enumerate(ref_t):
        noise_pred = vu[i] + guidance_scale * (vc[i] - vu[i])
        x_ref = ref.step(noise_pred, t, x_ref, return_dict=False)[0]

    x = mx.array(latents.numpy())
    for i in range(len(s.timesteps)):
        v = classifier_free_guidance(mx.array(vc[i].numpy()), mx.array(vu[i].numpy()), guidance_scale)
        x = s.step(v, i, x)
    assert x.dtype == mx.float32
    err = assert_close(x, x_ref, tol=1e-6, what="latents after Euler+CFG")
    print(f"Euler+CFG g={guidance_scale}: rel err {err:.2e}")
