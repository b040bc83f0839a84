"""The DiT target (train/dit.py) against diffusers' GlmImageTransformer2DModel + PEFT, fp32: the encodings are
inference's, the flow-matching loss and every adapter gradient equal torch's, several AdamW steps (warm-up + cosine,
clipping) end at torch's weights, the saved adapter is diffusers' file, and a drop-out is the unconditional pass.
Editing: the source's condition latents and prior ids are an editing request's, and the loss and gradients equal
torch's with diffusers' condition KV cache written (through its gradient) and read as its pipeline does.

That the training sigmas lie on inference's shifted schedule for an image size is the sampler's test
(test_scheduler.py::test_training_draws_lie_on_the_inference_shift); here, only that the trainer's sampler is the
one inference makes for the example's size."""

import dataclasses
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import assert_close, rel_err
from mlx.utils import tree_flatten
from PIL import Image

from mlx_glm_image import GlmImageTransformer2DModel, load_model, lora
from mlx_glm_image.pipeline import GlmImagePipeline, stages
from mlx_glm_image.pipeline.denoise import DenoiseInputs, Stepper
from mlx_glm_image.pipeline.glyphs import get_glyph_embeds
from mlx_glm_image.pipeline.image_processor import VaeImageProcessor
from mlx_glm_image.pipeline.prior_grid import prior_prompt, prior_token_ids
from mlx_glm_image.train import ar, optim
from mlx_glm_image.train import dit as train_dit

H, W = 64, 96
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
CONFIG = lora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
PROMPTS = ('a red cat "big" on the mat', 'the blue sky \'9\'')


SOURCE = (64, 64)  # the editing examples' fitted sources (height, width): another token count than the target's


def image(seed, h=H, w=W):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(model_dir):
    return GlmImagePipeline.from_pretrained(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def examples(pipe):
    out = []
    for i, prompt in enumerate(PROMPTS):
        codes = ar.target_codes(pipe.vision_language_encoder, pipe.processor, image(i), H, W)
        out.append(train_dit.dit_example(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None, image=image(i),
                                         prompt=prompt, codes=codes, height=H, width=W))
    return out


@pytest.fixture(scope="module")
def edit_examples(pipe):
    """Two editing examples: each target with its own fitted source of one size."""
    model, processor = pipe.vision_language_encoder, pipe.processor
    out = []
    for i, prompt in enumerate(PROMPTS):
        source = image(10 + i, *SOURCE)
        out.append(train_dit.dit_example(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None, image=image(i), prompt=prompt,
            codes=ar.target_codes(model, processor, image(i), H, W), height=H, width=W,
            source=source, source_codes=ar.target_codes(model, processor, source, *SOURCE)))
    return out


def trainable_pair(model_dir, seed=0):
    """Our DiT and diffusers' with the same trainable adapters: A as PEFT initialises it (ours, copied), B random
    (non-zero, so that A has a gradient), on both."""
    from diffusers import GlmImageTransformer2DModel as TorchDiT
    from peft import LoraConfig

    ours = load_model(GlmImageTransformer2DModel, model_dir, dtype="float32")
    paths = lora.add_trainable(ours, CONFIG, mx.random.key(seed))
    ref = TorchDiT.from_pretrained(model_dir / "transformer").float()
    ref.add_adapter(LoraConfig(r=CONFIG.r, lora_alpha=CONFIG.lora_alpha, target_modules=list(TARGETS)))
    g = np.random.default_rng(seed)
    modules = dict(ours.named_modules())
    with torch.no_grad():
        for path in paths:
            layer = modules[path]
            layer.lora_B = mx.array(g.standard_normal(layer.lora_B.shape).astype(np.float32) * 0.1)
            t = ref.get_submodule(path)
            t.lora_A["default"].weight.copy_(torch.from_numpy(np.array(layer.lora_A)))
            t.lora_B["default"].weight.copy_(torch.from_numpy(np.array(layer.lora_B)))
    mx.eval(ours.trainable_parameters())
    return ours, ref, paths


def torch_loss(ref, batch, d, kv_caches=None):
    inputs = {k: torch.from_numpy(np.array(v)) for k, v in train_dit.dit_inputs(batch, d.drop).items()}
    x0, noise = (torch.from_numpy(np.array(a)) for a in (batch.latents, d.noise))
    sigma = torch.from_numpy(np.array(d.sigma)).reshape(-1, 1, 1, 1)
    x_t = sigma * noise + (1 - sigma) * x0
    if kv_caches is not None:  # diffusers' GlmImagePipeline: the conditional pass reads, the unconditional skips
        kv_caches.set_mode("skip" if d.drop else "read")
    v = ref(hidden_states=x_t, timestep=torch.from_numpy(np.array(d.timestep)), **inputs, kv_caches=kv_caches,
            return_dict=False)[0]
    return torch.mean((v.float() - (noise - x0)) ** 2)


def torch_condition_cache(ref, batch):
    """The condition KV cache as diffusers' GlmImagePipeline writes it: per sample, a pass over its condition
    latents with no text, its own prior ids, timestep 0 and its pixel size (under autograd, as in training)."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    caches = GlmImageKVCache(num_layers=ref.config.num_layers)
    caches.set_mode("write")
    latents = torch.from_numpy(np.array(batch.condition_latents))
    for i in range(latents.shape[0]):
        ids = torch.from_numpy(np.array(batch.prior_token_image_ids[i]))
        ref(hidden_states=latents[i:i + 1], encoder_hidden_states=torch.zeros(1, 0, ref.config.text_embed_dim),
            prior_token_id=ids, prior_token_drop=torch.full_like(ids, False, dtype=torch.bool),
            timestep=torch.zeros((1,)), target_size=torch.tensor([batch.condition_size]),
            crop_coords=torch.zeros((1, 2)), kv_caches=caches)
        caches.next_sample()
    return caches


def ours_loss_and_grads(model, sampler, batch, d):
    loss, grads = nn.value_and_grad(model, lambda: train_dit.flow_matching_loss(model, sampler, batch, d))()
    return loss, grads


def torch_grads(ref):
    return {n.replace(".default.weight", ""): p.grad for n, p in ref.named_parameters() if p.requires_grad}


def test_encodings_are_inferences(pipe, examples, model_dir):
    """The latents are diffusers' VAE posterior mean normalized as the pipeline normalizes condition latents; the
    prior tokens are the target grid upsampled as the prior stage upsamples the AR model's grid; the glyphs are
    the glyph encoder's embeddings of the prompt and of the empty prompt."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").float().eval()
    pixels = torch.from_numpy(np.array(VaeImageProcessor(8).preprocess(image(0), height=H, width=W)))
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean).reshape(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).reshape(1, -1, 1, 1)
    assert_close(examples[0].latents, (z - mean) / std, 1e-4, what="normalized latents")

    codes = ar.target_codes(pipe.vision_language_encoder, pipe.processor, image(0), H, W)
    prompt = prior_prompt(pipe.vision_language_encoder, pipe.processor, [PROMPTS[0]], H, W)
    length = prompt.inputs["input_ids"].shape[1] + prompt.grids.offset
    sequence = np.concatenate([np.zeros(length, np.int64), codes.reshape(-1), [0]])[None]
    assert np.array_equal(np.array(examples[0].prior_token_ids), np.array(prior_token_ids(sequence, prompt)))
    assert len(np.unique(codes)) > 1, "a grid of one code would hide a transposed upsampling"

    for got, prompt in ((examples[0].prompt_embeds, PROMPTS[0]), (examples[0].negative_prompt_embeds, "")):
        np.testing.assert_array_equal(np.array(got), np.array(get_glyph_embeds(pipe.text_encoder, [prompt])))


def test_the_sampler_is_inferences_for_the_size(pipe, examples):
    """The trainer's sampler has inference's token count for the size (so its shift): its draws' sigmas are the
    1000-step schedule's of a sampler made as the denoise stage makes it."""
    t = pipe.transformer
    s = train_dit.training_sampler(pipe.components.get("scheduler"), t, examples[0].latents)
    rows, cols = pipe.components.config("transformer").token_grid(H // 8, W // 8)
    assert s.image_seq_len == rows * cols
    d = train_dit.draw(s, train_dit.DitBatch.of(examples), mx.random.key(3))
    full = type(s)(pipe.components.get("scheduler"), image_seq_len=rows * cols, num_inference_steps=1000)
    curve = dict(zip(full.timesteps.tolist(), full.sigmas.tolist()))
    expected = [curve[v + 1] for v in np.array(d.timestep).tolist()]
    assert np.array_equal(np.array(d.sigma), np.array(expected, np.float32))


@pytest.mark.parametrize("drop", [False, True])
def test_loss_and_gradients_equal_peft(model_dir, pipe, examples, drop):
    ours, ref, paths = trainable_pair(model_dir)
    batch = train_dit.DitBatch.of(examples)
    s = train_dit.training_sampler(pipe.components.get("scheduler"), ours, batch.latents)
    d = train_dit.draw(s, batch, mx.random.key(7), drop_probability=1.0 if drop else 0.0)
    assert d.drop == drop
    loss, grads = ours_loss_and_grads(ours, s, batch, d)
    want = torch_loss(ref, batch, d)
    want.backward()
    assert_close(loss, want.detach(), 1e-4, what="flow-matching loss")
    got, expected = dict(tree_flatten(grads)), torch_grads(ref)
    assert set(got) == set(expected) == {f"{p}.lora_{x}" for p in paths for x in "AB"}
    errors = {k: rel_err(got[k], expected[k]) for k in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"gradient of {worst}: relative error {errors[worst]:.3e}"
    assert all(float(np.abs(np.array(g)).max()) > 0 for g in got.values()), "every adapter weight has a gradient"


def test_editing_encodings_are_inferences(pipe, monkeypatch, tmp_path):
    """What an editing request gives write_condition_cache for a source (captured in a one-step edit: its condition
    latents, pixel size, prior ids and grid) is the editing example's for the same source, fitted as the request
    fits it, its codes by target_codes at its own size, given as a path."""
    captured = []
    write = stages.write_condition_cache
    monkeypatch.setattr(stages, "write_condition_cache", lambda *args: captured.append(args) or write(*args))
    raw = image(20, 100, 70)  # the request fits it to 64 x 96 (width x height)
    pipe(PROMPTS[0], image=raw, height=H, width=W, num_inference_steps=1, seed=0, output_type="latent")
    (_, conditions, image_ids, grids), = captured
    (latents, size), = conditions[0]

    fitted = pipe.components.facts.prepare_condition_images([[raw]])[0][0]
    assert fitted.size == (64, 96) != raw.size
    fitted.save(tmp_path / "source.png")
    codes = ar.target_codes(pipe.vision_language_encoder, pipe.processor, fitted, fitted.height, fitted.width)
    assert len(np.unique(codes)) > 1, "a grid of one code would hide a transposed upsampling"
    ex = train_dit.dit_example(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None, image=image(0),
                               prompt=PROMPTS[0], codes=codes[:2, :3], height=H, width=W,
                               source=tmp_path / "source.png", source_codes=codes)
    assert ex.condition_size == tuple(size) == (96, 64)
    np.testing.assert_array_equal(np.array(ex.condition_latents), np.array(latents))
    np.testing.assert_array_equal(np.array(ex.prior_token_image_ids[0]), np.array(image_ids[0]))
    np.testing.assert_array_equal(np.array(ex.source_image_grid_thw), np.array(grids[0]))


@pytest.mark.parametrize("drop", [False, True])
def test_editing_loss_and_gradients_equal_peft(model_dir, pipe, edit_examples, drop):
    """The loss writes the sources' KV cache (its adapters' gradients included) and the conditional pass reads it,
    a drop-out skips it: diffusers + PEFT's loss and gradients with the cache written as diffusers' pipeline writes
    it, under autograd."""
    ours, ref, paths = trainable_pair(model_dir)
    batch = train_dit.DitBatch.of(edit_examples)
    s = train_dit.training_sampler(pipe.components.get("scheduler"), ours, batch.latents)
    d = train_dit.draw(s, batch, mx.random.key(7), drop_probability=1.0 if drop else 0.0)
    loss, grads = ours_loss_and_grads(ours, s, batch, d)
    want = torch_loss(ref, batch, d, torch_condition_cache(ref, batch))
    want.backward()
    assert_close(loss, want.detach(), 1e-4, what="editing flow-matching loss")
    got, expected = dict(tree_flatten(grads)), torch_grads(ref)
    assert set(got) == set(expected) == {f"{p}.lora_{x}" for p in paths for x in "AB"}
    errors = {k: rel_err(got[k], expected[k]) for k in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"gradient of {worst}: relative error {errors[worst]:.3e}"

    # what the comparison can tell: the source moves the conditional pass only, and its write pass's gradient counts
    no_source = dataclasses.replace(batch, condition_latents=None, condition_size=None, prior_token_image_ids=None,
                                    source_image_grid_thw=None)
    plain = train_dit.flow_matching_loss(ours, s, no_source, d)
    assert (rel_err(loss, plain) > 1e-3) != drop
    if not drop:
        ref.zero_grad()
        with torch.no_grad():
            caches = torch_condition_cache(ref, batch)
        torch_loss(ref, batch, d, caches).backward()
        detached = torch_grads(ref)
        assert max(rel_err(got[k], detached[k]) for k in detached) > 1e-2


def test_editing_examples_and_batches_are_checked(pipe, examples, edit_examples):
    with pytest.raises(ValueError, match="sources all have one size or are all none"):
        train_dit.DitBatch.of([examples[0], edit_examples[1]])
    other = dataclasses.replace(edit_examples[1], condition_size=(32, 64))
    with pytest.raises(ValueError, match=r"sources all have one size .* got \['64x32', '64x64'\]"):
        train_dit.DitBatch.of([edit_examples[0], other])
    kw = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None, image=image(0), prompt=PROMPTS[0],
              codes=np.zeros((2, 3), np.int64), height=H, width=W)
    with pytest.raises(ValueError, match="needs both source and source_codes"):
        train_dit.dit_example(**kw, source=image(10, *SOURCE))
    with pytest.raises(ValueError, match="a 70x100 source needs 3x2 .* fit the source"):
        train_dit.dit_example(**kw, source=image(10, 100, 70), source_codes=np.zeros((3, 2), np.int64))


def test_adamw_steps_equal_torch(model_dir, pipe, examples):
    """Four optimizer steps, each over two micro-batches (accumulated), with warm-up + cosine and clipping that
    bites: the adapter weights equal torch.optim.AdamW + get_cosine_schedule_with_warmup + clip_grad_norm_."""
    from transformers import get_cosine_schedule_with_warmup

    settings = dict(learning_rate=5e-3, weight_decay=0.01, warmup_steps=2, steps=4)
    max_grad_norm, accumulation = 0.05, len(examples)
    ours, ref, paths = trainable_pair(model_dir, seed=1)
    start = {k: np.array(v) for k, v in tree_flatten(ours.trainable_parameters())}
    opt = optim.adamw(**settings)
    params = [p for p in ref.parameters() if p.requires_grad]
    topt = torch.optim.AdamW(params, lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
    sched = get_cosine_schedule_with_warmup(topt, settings["warmup_steps"], settings["steps"])
    s = train_dit.training_sampler(pipe.components.get("scheduler"), ours, examples[0].latents)
    keys, norms = mx.random.split(mx.random.key(11), settings["steps"] * len(examples)), []
    for step in range(settings["steps"]):
        acc = optim.Accumulator()
        topt.zero_grad()
        for micro, example in enumerate(examples):
            batch = train_dit.DitBatch.of([example])
            d = train_dit.draw(s, batch, keys[len(examples) * step + micro], drop_probability=0.5)
            acc.add(ours_loss_and_grads(ours, s, batch, d)[1])
            (torch_loss(ref, batch, d) / accumulation).backward()
        norm, _ = optim.apply_step(ours, opt, acc.mean(), max_grad_norm)
        tnorm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        topt.step()
        sched.step()
        mx.eval(ours.trainable_parameters(), opt.state)
        norms.append(float(norm))
        assert abs(float(norm) - float(tnorm)) <= 1e-4 * float(tnorm)
    assert max(norms) > max_grad_norm, "clipping is exercised"
    got = dict(tree_flatten(ours.trainable_parameters()))
    want = {n.replace(".default.weight", ""): p for n, p in ref.named_parameters() if p.requires_grad}
    errors = {k: rel_err(got[k], want[k]) for k in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{worst} after {settings['steps']} steps: relative error {errors[worst]:.3e}"
    assert max(rel_err(got[k], start[k]) for k in start) > 1e-2, "the steps moved the adapters"


def test_saved_adapter_is_diffusers_and_loads_everywhere(model_dir, pipe, examples, tmp_path):
    """The file has diffusers' keys (those its own save_lora_adapter writes for the same adapters); diffusers'
    load_lora_adapter reads it and gives our DiT's output; so does --lora's path (lora.read, load_lora_weights)."""
    from diffusers import GlmImageTransformer2DModel as TorchDiT
    from safetensors import safe_open

    ours, ref, _ = trainable_pair(model_dir, seed=2)
    dst = lora.save_diffusers(tmp_path / "ours", ours, CONFIG)
    assert dst == tmp_path / "ours" / "pytorch_lora_weights.safetensors"
    ref.save_lora_adapter(tmp_path / "diffusers")
    with safe_open(str(dst), "np") as a, safe_open(str(tmp_path / "diffusers" / dst.name), "np") as b:
        assert set(a.keys()) == set(b.keys())
        saved = json.loads(a.metadata()["lora_adapter_metadata"])
        theirs = json.loads(b.metadata()["lora_adapter_metadata"])
        assert a.metadata()["format"] == b.metadata()["format"]
        for field in ("r", "lora_alpha", "use_rslora", "use_dora", "peft_type", "lora_bias"):
            assert saved.get(field, False) == theirs[field], field
        assert sorted(saved["target_modules"]) == sorted(theirs["target_modules"])

    batch = train_dit.DitBatch.of(examples)
    s = train_dit.training_sampler(pipe.components.get("scheduler"), ours, batch.latents)
    d = train_dit.draw(s, batch, mx.random.key(5))
    inputs = train_dit.dit_inputs(batch, False)
    x_t = s.add_noise(batch.latents, d.noise, d.sigma)
    trained = ours(x_t, timestep=d.timestep, **inputs, return_dict=False)[0]

    loaded = TorchDiT.from_pretrained(model_dir / "transformer").float().eval()
    loaded.load_lora_adapter(str(tmp_path / "ours"), weight_name=dst.name, adapter_name="trained", prefix=None)
    with torch.no_grad():
        want = loaded(hidden_states=torch.from_numpy(np.array(x_t)), timestep=torch.from_numpy(np.array(d.timestep)),
                      **{k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}, return_dict=False)[0]
    assert_close(trained, want, 1e-4, what="diffusers with our adapter")

    base = np.array(pipe.transformer(x_t, timestep=d.timestep, **inputs, return_dict=False)[0])
    assert rel_err(trained, base) > 1e-3, "the adapter changes the output"
    pipe.load_lora_weights(tmp_path / "ours", adapter_name="trained")
    try:
        assert_close(pipe.transformer(x_t, timestep=d.timestep, **inputs, return_dict=False)[0], trained, 1e-5,
                     what="--lora with our adapter")
    finally:
        pipe.unload_lora_weights()


def test_drop_out_is_the_unconditional_pass(pipe, examples):
    """A drawn drop-out gives the DiT exactly the Stepper's unconditional pass (the empty prompt's glyphs, every
    prior embedding dropped), otherwise its conditional pass; the key decides, at about the probability."""
    batch = train_dit.DitBatch.of(examples)
    inputs = DenoiseInputs(prompt_embeds=batch.prompt_embeds, negative_prompt_embeds=batch.negative_prompt_embeds,
                           prior_token_ids=batch.prior_token_ids, target_size=batch.target_size,
                           crop_coords=batch.crop_coords)
    s = train_dit.training_sampler(pipe.components.get("scheduler"), pipe.transformer, batch.latents)
    cond, uncond = Stepper(pipe.transformer, s, inputs).passes
    for p, drop in ((cond, False), (uncond, True)):
        mine = train_dit.dit_inputs(batch, drop)
        assert np.array_equal(np.array(mine["encoder_hidden_states"]), np.array(p.encoder_hidden_states))
        assert np.array_equal(np.array(mine["prior_token_drop"]), np.array(p.prior_token_drop))
        assert mine["prior_token_drop"].shape == batch.prior_token_ids.shape
        for k, field in (("prior_token_id", "prior_token_ids"), ("target_size",) * 2, ("crop_coords",) * 2):
            assert np.array_equal(np.array(mine[k]), np.array(getattr(inputs, field)))
    drawn = [train_dit.draw(s, batch, mx.random.key(k), drop_probability=0.3).drop for k in range(200)]
    assert 0.2 < np.mean(drawn) < 0.4
    assert drawn == [train_dit.draw(s, batch, mx.random.key(k), drop_probability=0.3).drop for k in range(200)]
    assert not any(train_dit.draw(s, batch, mx.random.key(k)).drop for k in range(20))
