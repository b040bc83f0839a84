"""The step cache against cache-dit 1.5.3 on diffusers' GlmImagePipeline: the same tiny pipeline (a 6-block DiT) and
inputs; the same cached steps in both passes, the residual diffs within 1e-3 relative, the images within 2e-3."""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import assert_close, rel_err, to_mx
from PIL import Image

from tiny_checkpoints import LATENT, write_diffusion_side

from mlx_glm_image import DBCacheConfig, TaylorSeerCalibratorConfig
from mlx_glm_image.pipeline import GlmImagePipeline, flow

import cache_dit  # noqa: E402 - pinned in the test extra: a missing one fails here, never skips

STEPS = 20
SGLANG = dict(Fn_compute_blocks=2, Bn_compute_blocks=1, max_warmup_steps=4, residual_diff_threshold=0.4,
              max_continuous_cached_steps=4)
CASES = {
    "sglang": (SGLANG, 2),  # SGLang's GLM-Image settings, TaylorSeer order 2
    "F1B0W8R0.08": (dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=8, residual_diff_threshold=0.08), None),
    "max-cached": (dict(SGLANG, max_cached_steps=3), None),
    "taylorseer-1-interval": (dict(SGLANG, warmup_interval=2, max_continuous_cached_steps=-1), 1),
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("step-cache") / "tiny-glm-image"
    torch_pipe = write_diffusion_side(folder, layers=6, time_scale=0.3)
    torch_pipe.set_progress_bar_config(disable=True)
    return torch_pipe, GlmImagePipeline.from_pretrained(folder, dtype="float32", memory="resident")


def inputs(seed=3, editing=False):
    g = torch.Generator().manual_seed(seed)
    kw = dict(prompt='A sign that says "OPEN"', prior_token_ids=torch.randint(0, 40, (1, 24), generator=g),
              latents=torch.randn(1, LATENT, 8, 12, generator=g), height=64, width=96, num_inference_steps=STEPS,
              guidance_scale=1.5, output_type="np")
    if editing:
        rng = np.random.default_rng(seed)
        kw["image"] = [Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))]
        kw["source_image_grid_thw"] = [torch.tensor([[1, 4, 3]])]
        kw["prior_token_image_ids"] = [torch.randint(0, 40, (12,), generator=g)]
    return kw


def with_cache_dit(torch_pipe, kw, cache: dict, order, **extra):
    """diffusers' pipeline under cache-dit: its image and its summary (cached steps and residual diffs)."""
    pipe = copy.deepcopy(torch_pipe)
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**cache, **extra), calibrator_config=calibrator)
    try:
        image = pipe(**kw).images
        stats = cache_dit.summary(pipe)[0]
    finally:
        cache_dit.disable_cache(pipe)
    return image, stats


def with_mlx(pipe, kw, cache: dict | None, order):
    mlx_kw = {k: to_mx(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    for k in ("prior_token_image_ids", "source_image_grid_thw"):
        if k in mlx_kw:
            mlx_kw[k] = [to_mx(x) for x in mlx_kw[k]]
    out = pipe(**mlx_kw, cache_config=DBCacheConfig(**cache) if cache is not None else None,
               calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None)
    return out.images, out.cache_summary


def assert_same_decisions(ours: dict, theirs, what: str):
    for steps, diffs in (("cached_steps", "residual_diffs"), ("cfg_cached_steps", "cfg_residual_diffs")):
        assert ours[steps] == list(getattr(theirs, steps)), (what, steps, ours[steps], getattr(theirs, steps))
        want = {int(k): v for k, v in getattr(theirs, diffs).items()}
        assert sorted(ours[diffs]) == sorted(want), (what, diffs)
        for step, diff in want.items():
            assert abs(ours[diffs][step] - diff) <= 1e-3 * abs(diff), (what, diffs, step, ours[diffs][step], diff)


@pytest.mark.parametrize("case", list(CASES))
def test_equal_to_cache_dit(pipelines, case):
    torch_pipe, pipe = pipelines
    cache, order = CASES[case]
    kw = inputs()
    want, stats = with_cache_dit(torch_pipe, kw, cache, order)
    got, summary = with_mlx(pipe, kw, cache, order)
    assert stats.cached_steps or stats.cfg_cached_steps, "a case that caches nothing tests nothing"
    assert_same_decisions(summary, stats, case)
    assert_close(got, want, 2e-3, what=f"{case} image")
    plain = with_mlx(pipe, kw, None, None)[0]
    print(case, rel_err(got, want), rel_err(got, plain))
    assert rel_err(got, want) < rel_err(got, plain) / 10, "the cached image is cache-dit's, not the plain one"


def test_editing_equal_to_cache_dit(pipelines):
    """The condition images' KV-write pass is no step: cache-dit is told so (force_refresh_step_hint=1); ours writes
    the cache inside the first step, outside the blocks policy."""
    torch_pipe, pipe = pipelines
    kw = inputs(seed=5, editing=True)
    want, stats = with_cache_dit(torch_pipe, kw, SGLANG, 2, force_refresh_step_hint=1)
    got, summary = with_mlx(pipe, kw, SGLANG, 2)
    assert stats.cached_steps
    assert_same_decisions(summary, stats, "editing")
    assert_close(got, want, 2e-3, what="editing image")


def test_one_cache_without_guidance_equal_to_cache_dit(pipelines):
    """Without guidance there is one pass a step; with ``enable_separate_cfg=False`` cache-dit counts every DiT call
    as a step, as ours does. (With separate caches it would take every other call for an unconditional one.)"""
    torch_pipe, pipe = pipelines
    kw = dict(inputs(), guidance_scale=1.0)
    cache = dict(SGLANG, enable_separate_cfg=False)
    want, stats = with_cache_dit(torch_pipe, kw, cache, 2)
    got, summary = with_mlx(pipe, kw, cache, 2)
    assert stats.cached_steps and not stats.cfg_cached_steps
    assert_same_decisions(summary, stats, "one cache")
    assert_close(got, want, 2e-3, what="one cache image")
    with pytest.raises(ValueError, match="needs separate caches for the two passes of a guided step"):
        with_mlx(pipe, inputs(), cache, 2)


def test_a_threshold_of_zero_is_the_plain_computation(pipelines):
    _, pipe = pipelines
    kw = inputs()
    plain = with_mlx(pipe, kw, None, None)[0]
    got, summary = with_mlx(pipe, kw, dict(SGLANG, residual_diff_threshold=0.0), 2)
    assert np.array_equal(got, plain), "bit-identical"
    assert summary == {"cached_steps": [], "residual_diffs": {}, "cfg_cached_steps": [], "cfg_residual_diffs": {}}


def test_the_report_counts_the_blocks_computed(pipelines):
    _, pipe = pipelines
    events = list(pipe.stream(**{k: to_mx(v) if isinstance(v, torch.Tensor) else v for k, v in inputs().items()},
                              cache_config=DBCacheConfig(**SGLANG), seed=1))
    steps = [e for e in events if e.kind == "step"]
    assert all(e.blocks[1] == 2 * 6 for e in steps)
    computed = sum(e.blocks[0] for e in steps)
    image = next(e for e in events if e.kind == "image")
    cached = len(image.metadata["cache_summary"]["cached_steps"]) + len(image.metadata["cache_summary"]["cfg_cached_steps"])
    assert cached and computed == STEPS * 2 * 6 - cached * 3, "a cached pass skips its 3 middle blocks"
    assert image.metadata["cache"] == dict(SGLANG, warmup_interval=1, max_cached_steps=-1, enable_separate_cfg=None)


class TwoVelocities(flow.FlowMatchEulerSampler):
    """Heun's shape: the velocity at x, again at the Euler step's end, and a step with their mean."""

    def denoise_step(self, velocity, i, x):
        v = velocity(x, self.model_timestep(i))
        v = (v + velocity(self.step(v, i, x), self.model_timestep(min(i + 1, self.num_inference_steps - 1)))) / 2
        return self.step(v, i, x), v


def test_a_policy_counts_the_steppers_steps(pipelines, monkeypatch):
    """A sampler that asks for two velocities a step (one class, one SAMPLERS row): the warm-up and the limits
    stay in steps, as the policy gets the Stepper's step index, and TaylorSeer's second update in a step
    extrapolates from the earlier steps (finite)."""
    _, pipe = pipelines
    monkeypatch.setitem(flow.SAMPLERS, "twice", TwoVelocities)
    cache = DBCacheConfig(**dict(SGLANG, residual_diff_threshold=0.9, max_continuous_cached_steps=2, max_cached_steps=5))
    events = list(pipe.stream(**{k: to_mx(v) if isinstance(v, torch.Tensor) else v for k, v in inputs().items()},
                              sampler="twice", cache_config=cache,
                              calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=2)))
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == STEPS and all(e.blocks[1] == 2 * 2 * 6 for e in steps), "two velocities of two passes a step"
    image = next(e for e in events if e.kind == "image")
    summary = image.metadata["cache_summary"]
    # warm-up 4 steps, at most 2 cached steps in a row, 5 in all (counted in calls, they would end by step 5)
    assert summary["cached_steps"] == summary["cfg_cached_steps"] == [4, 5, 7, 8, 10]
    skipped = {e.index: e.blocks[0] for e in steps if e.blocks[0] < e.blocks[1]}
    assert skipped == {s: 2 * 2 * 3 for s in (4, 5, 7, 8, 10)}, "both calls of both passes skip the 3 middle blocks"
    assert set(summary["residual_diffs"]) <= set(range(4, STEPS))
    assert np.isfinite(image.image).all()


@pytest.mark.parametrize("config,message", [
    (dict(Fn_compute_blocks=0), "Fn_compute_blocks must be an integer >= 1, got 0"),
    (dict(Bn_compute_blocks=-1), "Bn_compute_blocks must be an integer >= 0"),
    (dict(residual_diff_threshold=float("nan")), "residual_diff_threshold must be a finite number"),
    (dict(max_continuous_cached_steps=-2), "max_continuous_cached_steps must be an integer >= -1"),
    (dict(warmup_interval="2"), "warmup_interval must be an integer >= 1, got '2'"),
])
def test_bad_settings_are_one_line(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DBCacheConfig(**config)


def test_more_blocks_than_the_dit_has(pipelines):
    _, pipe = pipelines
    kw = {k: to_mx(v) if isinstance(v, torch.Tensor) else v for k, v in inputs().items()}
    with pytest.raises(ValueError, match="Fn_compute_blocks \\+ Bn_compute_blocks \\(5 \\+ 2\\) must be at most"):
        pipe(**kw, cache_config=DBCacheConfig(Fn_compute_blocks=5, Bn_compute_blocks=2))
    mx.clear_cache()
