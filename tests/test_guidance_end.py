"""Guidance on the first steps only (``guidance_end``, --guidance-end; the guidance-interval idea of arXiv 2404.07724,
mflux's --cfg-end): against diffusers' GlmImagePipeline with its guidance turned off by ``callback_on_step_end``
after the same steps (its loop reads ``do_classifier_free_guidance`` at every step); the whole range equals today's
image bit for bit; the step report counts the passes run; the flag, the body field and the metadata key come from
the one name table.
"""

import numpy as np
import pytest
import torch
from commands import cli, cli_ok
from conftest import assert_close, to_mx
from PIL import Image

from tiny_checkpoints import LATENT

from mlx_glm_image import images_api, metadata
from mlx_glm_image.pipeline import GlmImagePipeline
from mlx_glm_image.pipeline.events import Event
from mlx_glm_image.pipeline.report import StageReport

PROMPT = 'A sign that says "OPEN" and \'late\''


@pytest.fixture(scope="module")
def pipelines(diffusion_side):
    folder, torch_pipe = diffusion_side
    torch_pipe.set_progress_bar_config(disable=True)
    return torch_pipe, GlmImagePipeline.from_pretrained(folder, dtype="float32")


def inputs(seed=3, height=64, width=96):
    g = torch.Generator().manual_seed(seed)
    prior = torch.randint(0, 40, (1, (height // 16) * (width // 16)), generator=g)
    return prior, torch.randn(1, LATENT, height // 8, width // 8, generator=g)


@pytest.mark.parametrize("end,steps", [(0.5, 4), (0.3, 5), (0.0, 3)])
def test_guidance_ends_as_diffusers_does_when_turned_off(pipelines, end, steps):
    torch_pipe, pipe = pipelines
    prior, latents = inputs()

    def turn_off(p, i, t, kwargs):
        if not i + 1 < end * steps:  # the next step is past the guided ones
            p._guidance_scale = 1.0
        return {}

    kw = dict(prompt=PROMPT, height=64, width=96, num_inference_steps=steps, guidance_scale=3.0, output_type="np")
    want = torch_pipe(prior_token_ids=prior, latents=latents, callback_on_step_end=turn_off,
                      **{**kw, "guidance_scale": 3.0 if end > 0 else 1.0}).images
    got = pipe(prior_token_ids=to_mx(prior), latents=to_mx(latents), guidance_end=end, **kw).images
    assert_close(got, want, 1e-4)
    full = pipe(prior_token_ids=to_mx(prior), latents=to_mx(latents), **kw).images
    assert np.abs(np.asarray(full) - np.asarray(got)).max() > 1e-3, "ending guidance early changes the image"


def test_the_whole_range_is_todays_image_bit_for_bit(pipelines):
    _, pipe = pipelines
    prior, latents = inputs(5)
    kw = dict(prompt=PROMPT, prior_token_ids=to_mx(prior), latents=to_mx(latents), height=64, width=96,
              num_inference_steps=4, guidance_scale=2.0, output_type="np")
    assert np.array_equal(np.asarray(pipe(**kw).images), np.asarray(pipe(guidance_end=1.0, **kw).images))


def test_the_step_report_counts_the_passes_run(pipelines):
    _, pipe = pipelines
    prior, _ = inputs()
    events = list(pipe.stream(PROMPT, prior_token_ids=to_mx(prior), height=64, width=96, num_inference_steps=5,
                              guidance_end=0.4, seed=1))
    passes = [e.passes for e in events if e.kind == "step"]
    assert passes == [(2, 2), (2, 2), (1, 2), (1, 2), (1, 2)]
    report = StageReport()
    for e in events:
        report.observe(e)
    report.observe(Event(kind="stage", stage="denoise", done=True, seconds=1.0, load_seconds=0.0, peak_memory=1))
    assert "7/10 DiT passes run" in report.line("denoise")


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "1", True])
def test_a_bad_value_is_refused_before_any_work(pipelines, value):
    _, pipe = pipelines
    with pytest.raises(ValueError, match="guidance_end must be a number from 0 to 1"):
        pipe.request(prompt="x", guidance_end=value)


def test_the_flag_and_the_metadata_key(model_dir, tmp_path):
    out = tmp_path / "a.png"
    cli_ok("-m", model_dir, "--prompt", PROMPT, "--height", 64, "--width", 64, "--steps", 3, "--guidance-end", 0.5,
           "--seed", 1, "--dtype", "float32", "--top-k", 1, "--output", out, "--quiet", timeout=300)
    assert metadata.read(out)["guidance_end"] == 0.5
    again = tmp_path / "b.png"
    cli_ok("--config-from-metadata", out, "--output", again, "--quiet", timeout=300)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    bad = cli("-m", model_dir, "--prompt", "x", "--guidance-end", 2, "--output", tmp_path / "c.png")
    assert bad.returncode != 0 and "guidance_end must be a number from 0 to 1" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "c.png").exists()


def test_the_body_field(pipelines):
    _, pipe = pipelines
    requests, _ = images_api.image_requests(pipe, {"prompt": "x", "guidance_end": 0.25, "size": "64x64"})
    assert requests[0].schedule.guidance_end == 0.25
    with pytest.raises(images_api.ApiError) as caught:
        images_api.image_requests(pipe, {"prompt": "x", "guidance_end": 2, "size": "64x64"})
    assert caught.value.status == 400 and "guidance_end must be a number from 0 to 1" in str(caught.value)
