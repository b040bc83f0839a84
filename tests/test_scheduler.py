"""The flow-matching sampler (pipeline/flow.py) against diffusers 0.42.1: GlmImagePipeline's schedule, its Euler +
CFG loop and the scheduler's scale_noise; its clean-latents prediction and training draws against the schedule."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import assert_close

from mlx_glm_image.pipeline.denoise import classifier_free_guidance
from mlx_glm_image.pipeline.flow import FlowMatchEulerSampler
from mlx_glm_image.scheduler import SchedulerConfig, calculate_shift

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
    return FlowMatchEulerSampler(SchedulerConfig.from_dict(config), image_seq_len=seq_len(height, width),
                                 num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas)


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
    config = SchedulerConfig.from_dict(RELEASED)
    with pytest.raises(ValueError):
        FlowMatchEulerSampler(config, image_seq_len=4096, num_inference_steps=3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError):
        FlowMatchEulerSampler(config, image_seq_len=None, num_inference_steps=3)  # no resolution
    s = FlowMatchEulerSampler(config, image_seq_len=4096, num_inference_steps=3)
    with pytest.raises(ValueError):
        s.step(mx.zeros((1,)), 5, mx.zeros((1,)))
    with pytest.raises(ValueError):
        s.sigmas[0] = 0.5  # fixed when it is made: nothing changes a request's schedule


def test_from_pretrained(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**RELEASED, "unknown_key": 1}))
    for where in (tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json"):
        config = SchedulerConfig.from_pretrained(where)
        assert config.time_shift_type == "linear" and config.base_shift == 0.25
    # a config.json without a key reads as diffusers reads it (tests/test_config_defaults.py checks every field)
    d = SchedulerConfig.from_dict({"num_train_timesteps": 1000})
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

    # the Stepper's way in: the sampler asks for the velocity at each step's latents and DiT timestep
    asked, y = [], mx.array(latents.numpy())
    for i in range(s.num_inference_steps):
        def velocity(x, t):
            asked.append(t)
            return classifier_free_guidance(mx.array(vc[i].numpy()), mx.array(vu[i].numpy()), guidance_scale)
        y, _ = s.denoise_step(velocity, i, y)
    assert np.array_equal(np.array(y), np.array(x)) and asked == [float(t) - 1 for t in ref_t]


def test_add_noise_equals_scale_noise():
    """add_noise at a schedule's sigma is diffusers' scale_noise at that timestep; per-sample sigmas are the
    flow-matching interpolation ``sigma * noise + (1 - sigma) * x0`` of each sample."""
    steps, (h, w) = 7, (512, 768)
    ref, ref_t = reference_schedule(RELEASED, steps, h, w)
    s = ours(RELEASED, steps, h, w)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 16, 8, 12, generator=g), torch.randn(3, 16, 8, 12, generator=g)
    for k in (0, 3, 6):
        want = ref.scale_noise(x0, ref_t[k : k + 1], noise)
        assert_close(s.add_noise(mx.array(x0.numpy()), mx.array(noise.numpy()), s.sigmas[k]), want, tol=1e-6,
                     what=f"scale_noise at step {k}")
    sigmas = np.array([0.9, 0.35, 0.02], np.float32)
    want = sigmas[:, None, None, None] * noise.numpy() + (1 - sigmas[:, None, None, None]) * x0.numpy()
    got = s.add_noise(mx.array(x0.numpy()), mx.array(noise.numpy()), mx.array(sigmas))
    assert_close(got, want, tol=1e-6, what="per-sample sigmas")


def test_x0_inverts_the_step():
    """On the straight path from x0 to noise (v = noise - x0), a step lands where add_noise puts the next sigma, and
    x0 of the latents before or after it is x0 again."""
    s = ours(RELEASED, 10, 256, 384)
    rng = np.random.default_rng(0)
    x0, noise = (mx.array(rng.standard_normal((2, 16, 32, 48)).astype(np.float32)) for _ in range(2))
    v = noise - x0
    for i in (0, 4, 9):
        x = s.add_noise(x0, noise, s.sigmas[i])
        after = s.step(v, i, x)
        assert_close(after, s.add_noise(x0, noise, s.sigmas[i + 1]), tol=1e-6, what=f"step {i}")
        assert_close(s.x0(x, v, i), x0, tol=1e-6, what=f"x0 before step {i}")
        assert_close(s.x0(after, v, i + 1), x0, tol=1e-6, what=f"x0 after step {i}")
    with pytest.raises(ValueError):
        s.x0(x, v, 11)


@pytest.mark.parametrize("hw", [(512, 512), (1024, 1024), (768, 1344)])
def test_training_draws_lie_on_the_inference_shift(hw):
    """A training draw: DiT timesteps t - 1 for integer t uniform over 1..1000, each with the sigma inference gives
    t at that size (diffusers' 1000-step schedule has every integer t; its 50-step one a subset)."""
    s = ours(RELEASED, 50, *hw)
    model_t, sigmas = s.random_timesteps(4096, mx.random.key(0))
    t = np.array(model_t) + 1
    assert model_t.dtype == sigmas.dtype == mx.float32 and t.shape == (4096,)
    assert np.array_equal(t, np.round(t)) and t.min() >= 1 and t.max() <= 1000
    assert abs(t.mean() - 500.5) < 3 * 288.7 / np.sqrt(4096) and len(np.unique(t)) > 950, "uniform over 1..1000"
    ref, ref_t = reference_schedule(RELEASED, 1000, *hw)
    assert np.array_equal(np.sort(ref_t.numpy()), np.arange(1, 1001, dtype=np.float32))
    on_curve = dict(zip(ref_t.numpy().tolist(), ref.sigmas.numpy().tolist()))
    np.testing.assert_array_equal(np.array(sigmas), np.array([on_curve[v] for v in t.tolist()], np.float32))
    inference = dict(zip(s.timesteps.tolist(), s.sigmas.tolist()))
    shared = [k for k, v in enumerate(t.tolist()) if v in inference]
    assert shared and all(np.array(sigmas)[k] == np.float32(inference[t[k]]) for k in shared)
    mu = calculate_shift(seq_len(*hw))
    assert np.allclose(np.array(sigmas), mu / (mu + 1 / (t / 1000) - 1), atol=1e-6)
    again, other = (np.array(s.random_timesteps(4096, mx.random.key(k))[0]) for k in (0, 1))
    assert np.array_equal(again, np.array(model_t)) and not np.array_equal(other, np.array(model_t)), "the key decides"
