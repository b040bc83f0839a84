"""Parity of the MLX AR prior model (mlx_glm_image.prior) with transformers' GlmImageForConditionalGeneration.

A tiny random model is written with transformers' ``save_pretrained`` (sharded) next to a tiny processor folder
(WordLevel tokenizer + chat template + GlmImageImageProcessorPil settings); the MLX side loads both from disk.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from conftest import assert_close, rel_err, to_mx  # noqa: E402
from PIL import Image  # noqa: E402

from mlx_glm_image.loading import load_model  # noqa: E402
from mlx_glm_image.models.ar import GlmImageForConditionalGeneration  # noqa: E402
from mlx_glm_image.models.ar.positions import decode_positions  # noqa: E402
from mlx_glm_image.pipeline.processor import GlmImageProcessor  # noqa: E402
from mlx_glm_image.pipeline import prior_tokens, request  # noqa: E402
from mlx_glm_image.pipeline.facts import sampling_settings  # noqa: E402
from mlx_glm_image.pipeline.prior_grid import generate_prior_tokens, prior_prompt, prior_sequences, prior_token_ids  # noqa: E402
from mlx_glm_image.pipeline.prior_tokens import drain, generate_step  # noqa: E402
from mlx_glm_image.pipeline.sample_utils import apply_top_k, greedy, make_sampler, top_p_candidates  # noqa: E402

from tiny_checkpoints import IMAGE_END, write_prior  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm_image")
    tproc, tmodel, vocab = write_prior(root)
    model = load_model(GlmImageForConditionalGeneration, root)
    proc = GlmImageProcessor.from_pretrained(root)
    return dict(root=root, tmodel=tmodel, tproc=tproc, model=model, proc=proc, vocab=vocab)


def _messages(prompts, images=None):
    out = []
    for i, p in enumerate(prompts):
        content = [] if images is None else [{"type": "image", "image": im} for im in images[i]]
        content.append({"type": "text", "text": p})
        out.append([{"role": "user", "content": content}])
    return out


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _torch_inputs(tiny, prompts, h, w, images=None):
    return tiny["tproc"].apply_chat_template(
        _messages(prompts, images), tokenize=True, padding=len(prompts) > 1, target_h=h, target_w=w,
        return_dict=True, return_tensors="pt",
    )


def _ours(tiny, prompts, h, w, images=None):
    return tiny["proc"].apply_chat_template(_messages(prompts, images), target_h=h, target_w=w, padding=len(prompts) > 1)


def _generate(model, inputs, max_new_tokens, **kwargs):
    """The decode loop over transformers' inputs, run to its end (greedy unless a sampler is given)."""
    arrays = {k: inputs[k].numpy() for k in ("input_ids", "attention_mask", "image_grid_thw", "images_per_sample")}
    return drain(generate_step(model, arrays, max_new_tokens=max_new_tokens, **kwargs))


def _greedy_sequences(model, prompt):
    return drain(prior_sequences(model, prompt, greedy))


PROMPTS2 = ["a red cat on the mat", "blue sky"]


# ---- loading ----------------------------------------------------------------------------------------------
def test_load_sharded_checkpoint(tiny):
    folder = tiny["root"] / "vision_language_encoder"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the tiny checkpoint should be sharded"
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(tiny["model"].parameters()))
    for name, p in tiny["tmodel"].named_parameters():
        v = np.array(ours[name])
        if p.ndim == 4:  # conv weights are stored channels-last in MLX
            v = v.transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(v, p.detach().numpy(), err_msg=name)
    assert set(ours) == {n for n, _ in tiny["tmodel"].named_parameters()}


def test_load_bf16_and_quantize(tiny):
    model = load_model(GlmImageForConditionalGeneration, tiny["root"], dtype="bfloat16")
    assert model.lm_head.weight.dtype == mx.bfloat16
    inputs = _ours(tiny, ["a cat"], 64, 64)
    ref = tiny["model"](inputs["input_ids"], inputs["attention_mask"], image_grid_thw=inputs["image_grid_thw"],
                        images_per_sample=inputs["images_per_sample"])
    out = model(inputs["input_ids"], inputs["attention_mask"], image_grid_thw=inputs["image_grid_thw"],
                images_per_sample=inputs["images_per_sample"])
    assert rel_err(out, ref) < 5e-2
    # the text model quantizes with the stock MLX helper (plain Linear / Embedding modules)
    nn.quantize(model.model.language_model, group_size=32, bits=8)
    assert isinstance(model.model.language_model.layers[0].mlp.gate_up_proj, nn.QuantizedLinear)
    out_q = model(inputs["input_ids"], inputs["attention_mask"], image_grid_thw=inputs["image_grid_thw"],
                  images_per_sample=inputs["images_per_sample"])
    assert rel_err(out_q, ref) < 1e-1


# ---- processor --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts,h,w", [(["a red cat on the mat"], 1024, 1024), (["a cat"], 64, 96),
                                         (PROMPTS2, 768, 1152)])
def test_processor_prompt_ids_text_to_image(tiny, prompts, h, w):
    ref = _torch_inputs(tiny, prompts, h, w)
    ours = _ours(tiny, prompts, h, w)
    for k in ("input_ids", "attention_mask", "image_grid_thw", "images_per_sample"):
        np.testing.assert_array_equal(ours[k], ref[k].numpy(), err_msg=k)
    assert (ours["input_ids"] != tiny["vocab"]["<unk>"]).all()


def test_processor_editing(tiny):
    images = [[_image(80, 112, 0)], [_image(100, 72, 1)]]
    ref = _torch_inputs(tiny, PROMPTS2, 96, 64, images)
    ours = _ours(tiny, PROMPTS2, 96, 64, images)
    for k in ("input_ids", "attention_mask", "image_grid_thw", "images_per_sample"):
        np.testing.assert_array_equal(ours[k], ref[k].numpy(), err_msg=k)
    assert_close(ours["pixel_values"], ref["pixel_values"], 1e-6, "pixel_values")


@pytest.mark.parametrize("h,w,sizes", [(64, 64, []), (128, 64, []), (96, 64, [(112, 80)]),
                                       (64, 64, [(64, 64), (128, 96)])])
def test_sequence_length_is_the_generated_sequence(tiny, h, w, sizes):
    """What the prompt-length check counts = the prompt the AR model gets + the grid tokens it generates."""
    images = [[_image(hh, ww, i) for i, (ww, hh) in enumerate(sizes)]] if sizes else None
    prompt = prior_prompt(tiny["model"], tiny["proc"], ['a cat "hi" 猫'], h, w, images)
    expected = prompt.inputs["input_ids"].shape[1] + prompt.max_new_tokens
    assert tiny["proc"].sequence_length('a cat "hi" 猫', h, w, sizes) == expected


# ---- positions --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,edit", [(64, 64, False), (64, 96, False), (1024, 512, False), (96, 64, True)])
def test_rope_index(tiny, h, w, edit):
    images = [[_image(80, 112, 0)], [_image(100, 72, 1)]] if edit else None
    inputs = _torch_inputs(tiny, PROMPTS2, h, w, images)
    tm = tiny["tmodel"].model
    pos, _ = tm.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["images_per_sample"],
                               inputs["attention_mask"])
    ref_decode = tm._cached_decode_position_ids.numpy()
    ours, decode = tiny["model"].get_rope_index(inputs["input_ids"].numpy(), inputs["image_grid_thw"].numpy(),
                                                inputs["images_per_sample"].numpy(), inputs["attention_mask"].numpy())
    np.testing.assert_array_equal(ours, pos.numpy())
    np.testing.assert_array_equal(decode, ref_decode)
    # decoding reads the table step by step, as transformers' compute_3d_position_ids
    L = inputs["input_ids"].shape[1]
    for step in (0, 5, ref_decode.shape[2] - 1):
        np.testing.assert_array_equal(decode_positions(decode, step, 1, 2, L),
                                      ref_decode[:, :, step:step + 1].transpose(1, 0, 2))


def test_preview_grid_larger_than_target(tiny):
    ours = _ours(tiny, ["a cat"], 64, 96)
    np.testing.assert_array_equal(ours["image_grid_thw"], [[1, 2, 3], [1, 13, 19]])


# ---- logits -----------------------------------------------------------------------------------------------
def _torch_logits(tiny, inputs, **kw):
    with torch.no_grad():
        return tiny["tmodel"](**{k: v for k, v in inputs.items()}, **kw).logits


@pytest.mark.parametrize("prompts,h,w", [(["a red cat on the mat"], 64, 96), (PROMPTS2, 128, 128)])
def test_logits_text_to_image(tiny, prompts, h, w):
    inputs = _torch_inputs(tiny, prompts, h, w)
    ref = _torch_logits(tiny, inputs)
    out = tiny["model"](inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                        image_grid_thw=inputs["image_grid_thw"].numpy(),
                        images_per_sample=inputs["images_per_sample"].numpy())
    valid = inputs["attention_mask"].numpy().astype(bool)
    assert_close(np.array(out)[valid], ref.numpy()[valid], what="prefill logits")


def test_a_text_config_without_a_rotary_share_runs_as_transformers_runs_it(tmp_path):
    """Upstream's own tests (diffusers' pipeline test, transformers' modeling test) name no partial_rotary_factor:
    transformers rotates the whole 16-wide head, sections [4, 2, 2]. Logits and greedy ids equal transformers'."""
    rope = {"num_attention_heads": 8, "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2]}}
    tproc, tmodel, _ = write_prior(tmp_path, eos_row_zero=True, text=rope)
    assert "partial_rotary_factor" not in json.loads(
        (tmp_path / "vision_language_encoder" / "config.json").read_text())["text_config"]["rope_parameters"]
    model = load_model(GlmImageForConditionalGeneration, tmp_path)
    assert model.config.text_config.rotary_dim == 16
    small = dict(root=tmp_path, tproc=tproc, tmodel=tmodel, proc=GlmImageProcessor.from_pretrained(tmp_path))
    inputs = _torch_inputs(small, ["a red cat on the mat"], 64, 96)
    ref = _torch_logits(small, inputs)
    out = model(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                image_grid_thw=inputs["image_grid_thw"].numpy(), images_per_sample=inputs["images_per_sample"].numpy())
    assert_close(out, ref, what="prefill logits")
    from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline as P

    grids = inputs["image_grid_thw"][: int(inputs["images_per_sample"][0])]
    n_new = P._compute_generation_params(grids, True)[0]
    with torch.no_grad():
        reference = tmodel.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new - 1,
                                    forced_eos_token_id=IMAGE_END, do_sample=False).numpy()
    prompt = prior_prompt(model, small["proc"], ["a red cat on the mat"], 64, 96)
    ours = _greedy_sequences(model, prompt)
    np.testing.assert_array_equal(ours, reference)
    assert len(np.unique(reference[:, inputs["input_ids"].shape[1]:])) > 5


def test_logits_with_source_image(tiny):
    images = [[_image(80, 112, 0)], [_image(100, 72, 1)]]
    inputs = _torch_inputs(tiny, PROMPTS2, 96, 64, images)
    ref = _torch_logits(tiny, inputs)
    out = tiny["model"](inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                        pixel_values=to_mx(inputs["pixel_values"]), image_grid_thw=inputs["image_grid_thw"].numpy(),
                        images_per_sample=inputs["images_per_sample"].numpy())
    valid = inputs["attention_mask"].numpy().astype(bool)
    assert_close(np.array(out)[valid], ref.numpy()[valid], what="editing logits")


def test_image_tokens(tiny):
    images = [[_image(80, 112, 0), _image(64, 64, 2)]]
    inputs = _torch_inputs(tiny, ["a cat"], 64, 64, images)
    tm = tiny["tmodel"]
    grids = inputs["image_grid_thw"][:-1]
    with torch.no_grad():
        feats = tm.get_image_features(inputs["pixel_values"], grids).pooler_output
        ref_ids = tm.get_image_tokens(feats).numpy()
        ref_hidden = tm.model.visual(inputs["pixel_values"], grid_thw=grids).last_hidden_state
    model = tiny["model"]
    ours_feats = model.get_image_features(to_mx(inputs["pixel_values"]), grids.numpy())
    assert_close(mx.concatenate(ours_feats), ref_hidden, what="vision features")
    ours_ids = np.array(model.get_image_tokens(ours_feats))
    np.testing.assert_array_equal(ours_ids, ref_ids)
    assert len(np.unique(ours_ids)) > 3


def test_cached_decode_matches_full_recompute(tiny):
    inputs = _torch_inputs(tiny, PROMPTS2, 64, 96)
    ids = inputs["input_ids"].numpy()
    B, L = ids.shape
    model = tiny["model"]
    pos, table = model.get_rope_index(ids, inputs["image_grid_thw"].numpy(), inputs["images_per_sample"].numpy(),
                                      inputs["attention_mask"].numpy())
    rng = np.random.default_rng(0)
    n = 20
    new = rng.integers(0, 64, (B, n))
    cache = model.make_cache(L + n + 5)  # a buffer longer than the tokens written: the rest must stay masked
    am = inputs["attention_mask"].numpy()
    outs = [np.array(model(ids, am, mx.array(pos), cache=cache))[:, -1]]
    for i in range(n - 1):
        am = np.concatenate([am, np.ones((B, 1), am.dtype)], 1)
        p = decode_positions(table, i, 1, B, L)
        outs.append(np.array(model(new[:, i:i + 1], am, mx.array(p), cache=cache))[:, -1])
    full_ids = torch.tensor(np.concatenate([ids, new[:, : n - 1]], 1))
    full_pos = np.concatenate([pos, decode_positions(table, 0, n - 1, B, L)], axis=2)
    full_am = torch.tensor(np.concatenate([inputs["attention_mask"].numpy(), np.ones((B, n - 1), np.int64)], 1))
    with torch.no_grad():
        ref = tiny["tmodel"](input_ids=full_ids, attention_mask=full_am, position_ids=torch.tensor(full_pos)).logits
    ref = ref[:, L - 1:].numpy()
    assert_close(np.stack(outs, 1), ref, what="cached decode logits")


# ---- generation -------------------------------------------------------------------------------------------
def _diffusers_post(seqs, grids, input_length, t2i=True):
    from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline as P

    n_new, offset, th, tw = P._compute_generation_params(torch.as_tensor(grids), t2i)
    rows = []
    for i in range(seqs.shape[0]):
        ids = P._extract_large_image_tokens(torch.as_tensor(seqs[i:i + 1]), input_length, offset, th * tw)
        rows.append(P._upsample_token_ids(ids, th, tw))
    return n_new, torch.cat(rows).numpy()


@pytest.fixture
def no_eos(tiny):
    """Zero the eos row of lm_head (logit 0 for eos, below the best of 79 random logits) on both sides."""
    t_w = tiny["tmodel"].lm_head.weight
    saved_t, saved_m = t_w.data.clone(), tiny["model"].lm_head.weight
    with torch.no_grad():
        t_w[IMAGE_END] = 0
    w = np.array(saved_m)
    w[IMAGE_END] = 0
    tiny["model"].lm_head.weight = mx.array(w)
    yield tiny
    with torch.no_grad():
        t_w.copy_(saved_t)
    tiny["model"].lm_head.weight = saved_m


@pytest.mark.parametrize("prompts,h,w,window,chunk", [(["a red cat on the mat"], 64, 96, 256, 512),
                                                      (PROMPTS2, 64, 64, 256, 512), (PROMPTS2, 64, 64, 5, 512),
                                                      (["a red cat on the mat"], 64, 96, 256, 7), (PROMPTS2, 64, 64, 5, 4)])
def test_greedy_generation_and_prior_ids(no_eos, prompts, h, w, window, chunk, monkeypatch):
    """window 5: the decode step is retraced for a new attention window every few tokens; chunk 7 and 4: the
    prompt goes into the cache in several prefill steps (padded rows too)."""
    monkeypatch.setattr(prior_tokens, "WINDOW", window)
    monkeypatch.setattr(prior_tokens, "PREFILL_CHUNK", chunk)
    tiny = no_eos
    inputs = _torch_inputs(tiny, prompts, h, w)
    grids = inputs["image_grid_thw"][: int(inputs["images_per_sample"][0])]
    from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline as P

    n_new = P._compute_generation_params(grids, True)[0]
    with torch.no_grad():
        ref = tiny["tmodel"].generate(**inputs, max_new_tokens=n_new, do_sample=False).numpy()
    L = inputs["input_ids"].shape[1]
    assert ref.shape[1] == L + n_new, "the tiny model should not stop early"
    ours = _generate(tiny["model"], inputs, n_new)
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ref[:, L:])) > 5
    # the pipeline-level helper: same prompts -> same sequence -> same 2x upsampled prior ids as diffusers
    prompt = prior_prompt(tiny["model"], tiny["proc"], prompts, h, w)
    seqs = _greedy_sequences(tiny["model"], prompt)
    with torch.no_grad():  # the prior stage completes its grid: transformers with the same two processors
        complete = tiny["tmodel"].generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new - 1,
                                           forced_eos_token_id=IMAGE_END, do_sample=False).numpy()
    np.testing.assert_array_equal(seqs, complete)
    np.testing.assert_array_equal(seqs[:, :-1], ref[:, :-1])
    prior, img_ids, src_grids = generate_prior_tokens(tiny["model"], tiny["proc"], prompts, h, w, sampler=greedy)
    np.testing.assert_array_equal(np.array(prior), np.array(prior_token_ids(seqs, prompt)))
    _, ref_prior = _diffusers_post(ref, grids, L)
    np.testing.assert_array_equal(np.array(prior), ref_prior)
    assert prior.shape == (len(prompts), (h // 16) * (w // 16))
    assert img_ids is None and src_grids is None


def test_greedy_stops_at_eos_like_transformers(tiny):
    # the unmodified tiny model emits eos early; finished rows continue with pad until all rows finish
    inputs = _torch_inputs(tiny, PROMPTS2, 64, 64)
    with torch.no_grad():
        ref = tiny["tmodel"].generate(**inputs, max_new_tokens=50, do_sample=False).numpy()
    L = inputs["input_ids"].shape[1]
    assert ref.shape[1] < L + 50 and (ref[:, L:] == IMAGE_END).any()
    ours = _generate(tiny["model"], inputs, 50, eos_token_id=IMAGE_END, pad_token_id=tiny["vocab"]["<pad>"])
    np.testing.assert_array_equal(ours, ref)


def test_greedy_editing(no_eos):
    tiny = no_eos
    images = [[_image(80, 112, 0)]]
    inputs = _torch_inputs(tiny, ["a red cat"], 64, 96, images)
    n_new = 2 * 3 + 1
    with torch.no_grad():
        ref = tiny["tmodel"].generate(**inputs, max_new_tokens=n_new, do_sample=False).numpy()
    prompt = prior_prompt(tiny["model"], tiny["proc"], ["a red cat"], 64, 96, images)
    seqs = _greedy_sequences(tiny["model"], prompt)[:, :-1]  # the last token: eos, forced
    ref = ref[:, :-1]
    prior, img_ids, src_grids = generate_prior_tokens(tiny["model"], tiny["proc"], ["a red cat"], 64, 96,
                                                      images=images, sampler=greedy)
    np.testing.assert_array_equal(np.array(prior), np.array(prior_token_ids(seqs, prompt)))
    L = inputs["input_ids"].shape[1]
    # the sequence carries the VQ ids in place of the placeholders (transformers keeps the placeholders)
    np.testing.assert_array_equal(seqs[:, L:], ref[:, L:])
    grids = inputs["image_grid_thw"]
    _, ref_prior = _diffusers_post(ref, grids, L, t2i=False)
    np.testing.assert_array_equal(np.array(prior), ref_prior)
    # condition image ids: VQ tokens upsampled 2x, grid doubled (diffusers' generate_prior_tokens semantics)
    tm = tiny["tmodel"]
    with torch.no_grad():
        feats = tm.get_image_features(inputs["pixel_values"], grids[:1]).pooler_output
        d32 = tm.get_image_tokens(feats)
    from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline as P

    ref_up = P._upsample_token_ids(d32, int(grids[0, 1]), int(grids[0, 2])).squeeze(0).numpy()
    np.testing.assert_array_equal(np.array(img_ids[0]), ref_up)
    np.testing.assert_array_equal(np.array(src_grids[0]), [[1, 2 * int(grids[0, 1]), 2 * int(grids[0, 2])]])


# ---- sampling ---------------------------------------------------------------------------------------------
def _top_p_kept(logits: mx.array, p: float) -> np.ndarray:
    """top_p_candidates' survivors, back in vocabulary order."""
    cand, ids = top_p_candidates(logits, p)
    kept = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(kept, np.array(ids), ~np.isinf(np.array(cand)), axis=-1)
    return kept


def test_top_k_top_p_match_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 200) * 3
    for scores in (logits, torch.round(logits)):  # rounded: many ties with the k-th logit, which stay
        for k in (1, 5, 50):
            ref = TopKLogitsWarper(k)(None, scores.clone())
            np.testing.assert_array_equal(np.isinf(np.array(apply_top_k(to_mx(scores), k))), torch.isinf(ref).numpy())
    for p in (0.1, 0.75, 0.95):
        ref = TopPLogitsWarper(p)(None, logits.clone())
        np.testing.assert_array_equal(~_top_p_kept(to_mx(logits), p), torch.isinf(ref).numpy())


def test_sampling_seeded():
    logits = mx.random.normal((2, 100)) * 2
    sample = make_sampler(temperature=0.9, top_p=0.75, top_k=50)
    a = [int(x) for x in np.array(sample(logits, mx.random.key(3)))]
    b = [int(x) for x in np.array(sample(logits, mx.random.key(3)))]
    assert a == b
    # sampled tokens stay inside the top-p nucleus
    kept = _top_p_kept(apply_top_k(logits / 0.9, 50), 0.75)
    for _ in range(5):
        t = np.array(sample(logits, mx.random.key(_)))
        assert kept[np.arange(2), t].all()


def test_sampling_follows_the_nucleus_distribution():
    """Token frequencies over many draws match transformers' warped softmax (sampling reads ids through the
    sorted order, so a wrong mapping would move the mass to other tokens)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 2
    warped = TopPLogitsWarper(0.75)(None, TopKLogitsWarper(20)(None, TemperatureLogitsWarper(0.9)(None, logits)))
    want = torch.softmax(warped, -1)[0].numpy()
    n = 20000
    sample = make_sampler(temperature=0.9, top_p=0.75, top_k=20)
    draws = np.array(sample(mx.broadcast_to(to_mx(logits), (n, 40)), mx.random.key(1)))
    freq = np.bincount(draws, minlength=40) / n
    assert freq[want == 0].sum() == 0
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_sampled_generation_reproducible(no_eos):
    tiny = no_eos
    sampler = make_sampler(**sampling_settings(tiny["model"].generation_config, temperature=0.9, top_p=0.75))
    kw = dict(model=tiny["model"], processor=tiny["proc"], prompts=["a cat"], height=64, width=64, sampler=sampler)
    a = generate_prior_tokens(**kw, key=7)[0]
    b = generate_prior_tokens(**kw, key=mx.random.key(7))[0]
    c = generate_prior_tokens(**kw, key=8)[0]
    np.testing.assert_array_equal(np.array(a), np.array(b))
    assert not np.array_equal(np.array(a), np.array(c))


def test_an_early_end_token_never_cuts_the_grid(tiny):
    """The unmodified tiny model emits its end token early: the prior stage masks it until the grid is complete
    and forces it after, exactly as transformers' min_new_tokens + forced_eos_token_id do (greedy), and sampled
    runs complete the grid for every seed."""
    prompts, h, w = PROMPTS2, 64, 64
    inputs = _torch_inputs(tiny, prompts, h, w)
    prompt = prior_prompt(tiny["model"], tiny["proc"], prompts, h, w)
    n_new = prompt.max_new_tokens
    with torch.no_grad():
        early = tiny["tmodel"].generate(**inputs, max_new_tokens=n_new, do_sample=False).numpy()
        ref = tiny["tmodel"].generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new - 1,
                                      forced_eos_token_id=IMAGE_END, do_sample=False).numpy()
    L = inputs["input_ids"].shape[1]
    assert early.shape[1] < L + n_new, "the tiny model should end early unconstrained"
    seqs = _greedy_sequences(tiny["model"], prompt)
    np.testing.assert_array_equal(seqs, ref)
    assert (seqs[:, -1] == IMAGE_END).all() and not (seqs[:, L:-1] == IMAGE_END).any()
    sampler = make_sampler(**sampling_settings(tiny["model"].generation_config))  # the checkpoint's settings
    for seed in range(4):
        ids, _, _ = generate_prior_tokens(tiny["model"], tiny["proc"], prompts, h, w, sampler=sampler, key=seed)
        assert ids.shape == (2, (h // 16) * (w // 16))


@pytest.mark.parametrize("place", ["chat_template.jinja", "chat_template.json", "processor_config.json",
                                   "tokenizer_config.json"])
def test_chat_template_read_where_transformers_reads_it(tiny, tmp_path, place):
    import shutil

    folder = shutil.copytree(tiny["root"] / "processor", tmp_path / "processor")
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    if place == "chat_template.jinja":
        (folder / place).write_text(template)
    else:
        config = json.loads((folder / place).read_text()) if (folder / place).exists() else {}
        config["chat_template"] = template
        (folder / place).write_text(json.dumps(config))
    proc = GlmImageProcessor.from_pretrained(folder)
    assert proc.chat_template == template
    assert proc.render(_messages(["a cat"])) == tiny["proc"].render(_messages(["a cat"]))


@pytest.mark.parametrize("config,want", [
    (None, dict(temperature=0.9, top_p=0.75, top_k=0)),  # no generation_config.json: the published settings
    ({"temperature": 0.7, "top_p": 0.5}, dict(temperature=0.7, top_p=0.5, top_k=50)),  # transformers' for the rest
])
def test_sampling_defaults_from_the_checkpoint(tiny, monkeypatch, config, want):
    """The pipeline's AR stage method samples as the model's generation_config says (tests/fast/test_request.py:
    the same for a call, from the checkpoint's facts)."""
    from mlx_glm_image import GlmImagePipeline

    seen = {}
    monkeypatch.setattr(request, "make_sampler", lambda **k: seen.update(k) or greedy)
    model = tiny["model"]
    pipe = GlmImagePipeline(vision_language_encoder=model, processor=tiny["proc"])
    # set and restored by hand: an MLX module keeps a dict attribute as its own item, which monkeypatch cannot restore
    saved = model.generation_config
    model.generation_config = config or {}
    try:
        pipe.generate_prior_tokens(["a cat"], 64, 64)
        assert {k: seen[k] for k in want} == want and make_sampler(**seen) is not greedy
        pipe.generate_prior_tokens(["a cat"], 64, 64, temperature=0.3, top_k=5)
        assert seen["temperature"] == 0.3 and seen["top_k"] == 5
    finally:
        model.generation_config = saved
