"""End to end against diffusers' GlmImagePipeline: same tiny random checkpoint, same prior tokens and noise.

diffusers runs its pipeline without the AR model when prior_token_ids are given (and the condition images'
prior ids and grids for editing), which isolates the diffusion side: glyph encoder, DiT + KV cache,
scheduler, CFG, VAE encode/decode, image pre/post-processing.
"""


import gc

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import assert_close, to_mx
from PIL import Image

from tiny_checkpoints import LATENT

from mlx_glm_image.pipeline import GlmImagePipeline

@pytest.fixture(scope="module")
def pipelines(diffusion_side):
    folder, torch_pipe = diffusion_side
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
    assert set(out.timings) == {"prior", "glyphs", "denoise", "decode"}
    assert all(v > 0 for v in out.peak_memory.values() if v is not None)
    again = pipe(prompt="x", prior_token_ids=mx.zeros((1, 16), dtype=mx.int32), height=64, width=64, num_inference_steps=1, seed=1)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0])), "a seed fixes the noise"


# ---------------------------------------------------------------------------------------------------------
# diffusers' call conventions


def test_callback_on_step_end_like_diffusers(pipelines):
    """Called once per step with the asked tensors; a returned `latents` replaces the loop's (same protocol and
    same result as diffusers')."""
    torch_pipe, pipe, _ = pipelines
    g = torch.Generator().manual_seed(9)
    prior = torch.randint(0, 40, (1, 16), generator=g)
    latents = torch.randn(1, LATENT, 8, 8, generator=g)
    seen = {"torch": [], "mlx": []}

    def callback(side):
        def fn(p, i, t, kwargs):
            seen[side].append((i, sorted(kwargs)))
            return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}
        return fn

    kw = dict(prompt=PROMPTS[0], height=64, width=64, num_inference_steps=3, output_type="latent",
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    want = torch_pipe(prior_token_ids=prior, latents=latents, callback_on_step_end=callback("torch"), **kw).images
    got = pipe(prior_token_ids=to_mx(prior), latents=to_mx(latents), callback_on_step_end=callback("mlx"), **kw).images
    assert seen["mlx"] == seen["torch"] == [(i, ["latents", "prompt_embeds"]) for i in range(3)]
    assert_close(got, want, 1e-4)
    plain = pipe(prior_token_ids=to_mx(prior), latents=to_mx(latents), **kw).images
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-3, "the returned latents must replace the loop's"
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(prior_token_ids=to_mx(prior), **dict(kw, callback_on_step_end_tensor_inputs=["noise"]))


def test_generator_return_dict_and_output_types(pipelines):
    _, pipe, _ = pipelines
    kw = dict(prompt="x", prior_token_ids=mx.zeros((1, 16), dtype=mx.int32), height=64, width=64, num_inference_steps=1)
    by_seed = pipe(**kw, seed=4, output_type="np").images
    (by_key,) = pipe(**kw, generator=mx.random.key(4), output_type="np", return_dict=False)
    by_int = pipe(**kw, generator=4, output_type="mx").images
    assert np.array_equal(by_seed, by_key)
    assert isinstance(by_int, mx.array) and by_int.shape == (1, 3, 64, 64)
    assert_close(np.asarray(by_int).transpose(0, 2, 3, 1), by_seed, 0)


# ---------------------------------------------------------------------------------------------------------
# Components kept or freed by the memory policy


def _run(pipe, active, full=False):
    def record(p, i, t, kwargs):
        mx.eval(kwargs["latents"])
        active.append(mx.get_active_memory())
        return {}

    out = pipe('a red cat "big"', height=64, width=96, num_inference_steps=2, seed=3, top_k=1,
               callback_on_step_end=record, output_type="np")
    return out if full else out.images


def _weights(folder):
    from mlx_glm_image.loading import weight_bytes

    return {name: weight_bytes(folder / name) for name in ("vision_language_encoder", "text_encoder", "transformer", "vae")}


def test_resident_pipeline_loads_each_model_once(model_dir, monkeypatch):
    import mlx_glm_image.loading as loading

    reads = []
    real = loading.load_weights
    monkeypatch.setattr(loading, "load_weights", lambda folder: reads.append(folder) or real(folder))
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="resident")
    assert reads == [] and pipe.loads == 0, "nothing heavy is read before the first call"
    active = []
    first = _run(pipe, active)
    assert len(reads) == pipe.loads == 4
    # while denoising, the AR model, the glyph encoder and the DiT are all still held
    w = _weights(model_dir)
    assert min(active) >= 0.9 * (w["vision_language_encoder"] + w["text_encoder"] + w["transformer"])
    second = _run(pipe, [])
    assert len(reads) == 4, "a second call reads no weight file"
    assert np.array_equal(first, second)
    assert pipe.transformer is pipe.transformer and pipe.vae.config.latent_channels == LATENT


def test_staged_pipeline_frees_each_stage(model_dir):
    """Staged: each model is loaded for its stage and freed after it, so the DiT stage holds the DiT alone (not
    the AR model) and no model stage peaks at the sum of the components; the image is the
    resident one's. (The tiny VAE's decode peak is its activations at 64x96, above these tiny weights.)"""
    resident = _run(GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="resident"), [], full=True)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()  # what other tests' objects hold
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="staged")
    active = []
    staged = _run(pipe, active, full=True)
    w = _weights(model_dir)
    for stage in ("prior", "glyphs", "denoise"):
        assert staged.peak_memory[stage] - base < sum(w.values()), (stage, base, staged.peak_memory, w)
    # (file sizes include the safetensors headers, a large share for tiny models: hence 0.9)
    freed = 0.9 * w["vision_language_encoder"]
    assert staged.peak_memory["denoise"] < resident.peak_memory["denoise"] - freed, (staged.peak_memory, w)
    assert not [n for n in ("vision_language_encoder", "text_encoder", "transformer", "vae") if pipe.components.holds(n)]
    assert np.array_equal(resident.images, staged.images)
    assert pipe.memory == "staged" and pipe.loads == 4
    _run(pipe, [])
    assert pipe.loads == 8, "staged loads again on the next call"


def test_auto_memory_chooses_by_weight_bytes(model_dir, monkeypatch):
    from mlx_glm_image.pipeline import components as P

    total = sum(_weights(model_dir).values())
    monkeypatch.setattr(P, "memory_budget", lambda: int(total / P.RESIDENT_SHARE) + 1)
    assert GlmImagePipeline.from_pretrained(model_dir).memory == "resident"
    monkeypatch.setattr(P, "memory_budget", lambda: int(total / P.RESIDENT_SHARE) - 1)
    assert GlmImagePipeline.from_pretrained(model_dir).memory == "staged"
    with pytest.raises(ValueError, match="memory must be one of"):
        GlmImagePipeline.from_pretrained(model_dir, memory="lots")
