"""End to end against diffusers' GlmImagePipeline: same tiny random checkpoint, same prior tokens and noise.

diffusers runs its pipeline without the AR model when prior_token_ids are given (and the condition images'
prior ids and grids for editing), which isolates the diffusion side: glyph encoder, DiT + KV cache,
scheduler, CFG, VAE encode/decode, image pre/post-processing.
"""


import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import assert_close, to_mx
from PIL import Image

from tiny_checkpoints import LATENT, write_diffusion_side

from mlx_glm_image.pipeline import GlmImagePipeline

@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm") / "tiny-glm-image"
    torch_pipe = write_diffusion_side(folder)
    torch_pipe.set_progress_bar_config(disable=True)
    return torch_pipe, GlmImagePipeline.from_pretrained(folder, dtype="float32"), folder


PROMPTS = ['A sign that says "OPEN" and \'late\'', "no quoted text here"]


@pytest.mark.parametrize("height,width,steps,guidance,batch", [(64, 96, 3, 1.5, 1), (96, 64, 2, 4.0, 2), (64, 64, 2, 1.0, 1)])
def test_text_to_image_matches_diffusers(pipelines, height, width, steps, guidance, batch):
    torch_pipe, pipe, _ = pipelines
    g = torch.Generator().manual_seed(3)
    grid = (height // 16) * (width // 16)
    prior = torch.randint(0, 40, (batch, grid), generator=g)
    latents = torch.randn(batch, LATENT, height // 8, width // 8, generator=g)
    prompt = PROMPTS[:batch] if batch > 1 else PROMPTS[0]
    want = torch_pipe(prompt=prompt, prior_token_ids=prior, latents=latents, height=height, width=width,
                      num_inference_steps=steps, guidance_scale=guidance, output_type="np").images
    got = pipe(prompt=prompt, prior_token_ids=to_mx(prior), latents=to_mx(latents), height=height, width=width,
               num_inference_steps=steps, guidance_scale=guidance, output_type="np").images
    assert_close(got, want, 1e-4)

    pil = pipe(prompt=prompt, prior_token_ids=to_mx(prior), latents=to_mx(latents), height=height, width=width,
               num_inference_steps=steps, guidance_scale=guidance).images
    assert len(pil) == batch and pil[0].size == (width, height)


def test_latent_output_and_images_per_prompt(pipelines):
    torch_pipe, pipe, _ = pipelines
    g = torch.Generator().manual_seed(5)
    prior = torch.randint(0, 40, (1, 16), generator=g)
    latents = torch.randn(2, LATENT, 8, 8, generator=g)
    want = torch_pipe(prompt=PROMPTS[0], prior_token_ids=prior, latents=latents, height=64, width=64, num_inference_steps=2,
                      num_images_per_prompt=2, output_type="latent").images
    got = pipe(prompt=PROMPTS[0], prior_token_ids=to_mx(prior), latents=to_mx(latents), height=64, width=64,
               num_inference_steps=2, num_images_per_prompt=2, output_type="latent").images
    assert_close(got, want, 1e-4)


@pytest.mark.parametrize("batch,per_prompt", [(1, 1), (1, 2), (2, 1)], ids=["one", "two-per-prompt", "two-prompts"])
def test_image_editing_matches_diffusers(pipelines, batch, per_prompt):
    """Condition images of different sizes: VAE encode, the KV-cache write pass, then read/skip per step; one
    cache expanded to several images per prompt, or one cache per prompt."""
    torch_pipe, pipe, _ = pipelines
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(7)
    sizes = [((64, 48), (32, 64))] * batch  # samples' caches are batched: same condition lengths (diffusers too)
    images = [[Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in pair] for pair in sizes]
    # per condition image: its d32 grid upsampled 2x -> (t, 2h, 2w) on the DiT's token grid
    grids = [torch.tensor([[1, h // 16, w // 16] for h, w in pair]) for pair in sizes]
    image_ids = [torch.randint(0, 40, (int(gr.prod(-1).sum()),), generator=g) for gr in grids]
    prior = torch.randint(0, 40, (batch, 16), generator=g)
    latents = torch.randn(batch * per_prompt, LATENT, 8, 8, generator=g)
    prompt = PROMPTS[:batch] if batch > 1 else PROMPTS[0]
    image = images if batch > 1 else images[0]
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=1.5, num_images_per_prompt=per_prompt, output_type="np")
    want = torch_pipe(prompt=prompt, image=image, prior_token_ids=prior, prior_token_image_ids=image_ids,
                      source_image_grid_thw=grids, latents=latents, **kw).images
    got = pipe(prompt=prompt, image=image, prior_token_ids=to_mx(prior), prior_token_image_ids=[to_mx(x) for x in image_ids],
               source_image_grid_thw=[to_mx(x) for x in grids], latents=to_mx(latents), **kw).images
    assert_close(got, want, 1e-4)
    plain = pipe(prompt=prompt, prior_token_ids=to_mx(prior), latents=to_mx(latents), **kw).images
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-3, "the condition images must matter"


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=100, width=64), "multiples of 32"),
    (dict(prompt=None), "prompt"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(prior_token_image_ids=[mx.zeros((4,))]), "provided together"),
    (dict(latents=mx.zeros((1, LATENT, 4, 4))), "latents must have shape"),
])
def test_bad_arguments(pipelines, kwargs, message):
    _, pipe, _ = pipelines
    args = dict(prompt="x", prior_token_ids=mx.zeros((1, 16), dtype=mx.int32), height=64, width=64, num_inference_steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pipe(**args)


def test_stages_report_time_and_memory(pipelines):
    _, pipe, _ = pipelines
    out = pipe(prompt="x", prior_token_ids=mx.zeros((1, 16), dtype=mx.int32), height=64, width=64, num_inference_steps=1, seed=1)
    assert set(out.timings) == {"prior", "glyph encoder", "denoising", "vae decode"}
    assert all(v > 0 for v in out.peak_memory.values() if v is not None)
    again = pipe(prompt="x", prior_token_ids=mx.zeros((1, 16), dtype=mx.int32), height=64, width=64, num_inference_steps=1, seed=1)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0])), "a seed fixes the noise"
