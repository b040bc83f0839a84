"""Parity of the MLX GlmImageTransformer2DModel with diffusers 0.42.1 (same random weights, CPU, fp32)."""

import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import assert_close, rel_err, to_mx

from diffusers import GlmImageTransformer2DModel as TorchDiT
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.transformers import transformer_glm_image as ref

from mlx_glm_image import GlmImageKVCache, GlmImageTransformer2DModel, load_model
from mlx_glm_image.models.dit import rope_2d, timestep_embedding
from mlx_glm_image.pipeline.denoise import queued_steps

TOL = 1e-4

CONFIGS = {
    "2x16": dict(num_attention_heads=2, attention_head_dim=16),
    "4x8": dict(num_attention_heads=4, attention_head_dim=8),
    "3x32": dict(num_attention_heads=3, attention_head_dim=32),
}


def tiny_config(heads=2, head_dim=16, layers=2):
    return dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, text_embed_dim=24, time_embed_dim=32, condition_dim=8,
        prior_vq_quantizer_codebook_size=50,
    )


def make_models(tmp_path, heads=2, head_dim=16, layers=2, shard="30KB", dtype=None):
    """A random diffusers DiT saved with save_pretrained (sharded) and the MLX model loaded from that folder."""
    torch_model = TorchDiT(**tiny_config(heads, head_dim, layers)).eval()
    folder = tmp_path / f"transformer_{heads}x{head_dim}"
    torch_model.save_pretrained(folder, max_shard_size=shard)
    return torch_model, load_model(GlmImageTransformer2DModel, folder, dtype=dtype)


def inputs(batch, h, w, text_len, cfg, drop="mixed", timesteps=None):
    grid = (h // 2) * (w // 2)
    t = torch.tensor(timesteps if timesteps is not None else [999.0, 500.0, 3.0][:batch])
    if drop == "mixed":
        drop_mask = torch.rand(batch, grid) > 0.5
    else:
        drop_mask = torch.full((batch, grid), drop)
    return dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], h, w),
        encoder_hidden_states=torch.randn(batch, text_len, cfg["text_embed_dim"]),
        prior_token_id=torch.randint(0, cfg["prior_vq_quantizer_codebook_size"], (batch, grid)),
        prior_token_drop=drop_mask,
        timestep=t,
        target_size=torch.tensor([[h * 8.0, w * 8.0]] * batch),
        crop_coords=torch.zeros(batch, 2),
    )


def run_torch(model, kw, **extra):
    with torch.no_grad():
        return model(**kw, **extra, return_dict=False)[0]


def run_mlx(model, kw, **extra):
    return model(**{k: to_mx(v) for k, v in kw.items()}, **extra, return_dict=False)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("dit")
    return {name: make_models(tmp, **dict(heads=c["num_attention_heads"], head_dim=c["attention_head_dim"])) for name, c in CONFIGS.items()}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(
    "batch,h,w,text_len",
    [(1, 8, 8, 5), (2, 6, 10, 7), (3, 10, 4, 3), (2, 8, 6, 0)],
    ids=["b1-square", "b2-wide", "b3-tall", "b2-empty-text"],
)
def test_forward_parity(models, config, batch, h, w, text_len):
    torch_model, mlx_model = models[config]
    kw = inputs(batch, h, w, text_len, tiny_config())
    assert_close(run_mlx(mlx_model, kw), run_torch(torch_model, kw), TOL)


@pytest.mark.parametrize("drop", [False, True, "mixed"])
def test_prior_drop(models, drop):
    torch_model, mlx_model = models["2x16"]
    kw = inputs(2, 8, 8, 4, tiny_config(), drop=drop)
    assert_close(run_mlx(mlx_model, kw), run_torch(torch_model, kw), TOL)


def test_prior_drop_changes_output(models):
    """The drop flag must reach the prior embedding (a test of the test: both settings differ)."""
    _, mlx_model = models["2x16"]
    kw = inputs(1, 8, 8, 4, tiny_config(), drop=False)
    kept = run_mlx(mlx_model, kw)
    kw["prior_token_drop"] = torch.ones_like(kw["prior_token_drop"])
    assert rel_err(run_mlx(mlx_model, kw), kept) > 1e-2


def test_text_mask_with_padding(models):
    torch_model, mlx_model = models["4x8"]
    kw = inputs(3, 6, 8, 6, tiny_config())
    mask = torch.ones(3, 6)
    mask[1, :2] = 0
    mask[2, :5] = 0
    assert_close(run_mlx(mlx_model, kw, attention_mask=to_mx(mask)), run_torch(torch_model, kw, attention_mask=mask), TOL)


def test_scalar_like_inputs_as_the_pipeline_passes_them(models):
    """The pipeline's condition pass: 1-D prior ids and drop, an empty text of batch 1, timestep (1,)."""
    torch_model, mlx_model = models["2x16"]
    ids = torch.randint(0, 50, (20,))
    kw = dict(
        hidden_states=torch.randn(1, 4, 8, 10),
        encoder_hidden_states=torch.zeros(1, 0, 24),
        prior_token_id=ids,
        prior_token_drop=torch.zeros_like(ids, dtype=torch.bool),
        timestep=torch.zeros(1),
        target_size=torch.tensor([[64, 80]]),
        crop_coords=torch.zeros(1, 2),
    )
    assert_close(run_mlx(mlx_model, kw), run_torch(torch_model, kw), TOL)


def test_bf16_close_to_fp32_reference(tmp_path):
    torch.manual_seed(1)
    torch_model, mlx_model = make_models(tmp_path, layers=3, dtype="bfloat16")
    assert mlx_model.dtype == mx.bfloat16
    kw = inputs(2, 8, 8, 5, tiny_config())
    out = run_mlx(mlx_model, kw)
    assert out.dtype == mx.bfloat16
    err = rel_err(out, run_torch(torch_model, kw))
    # measured ~0.8% at this size; bf16 keeps 8 mantissa bits
    assert err < 0.03, err


# ---------------------------------------------------------------------------------------------------------
# KV cache: condition images written once, read by the conditional pass, skipped by the unconditional one.


def condition_pass(model, cache, latent, ids, to_input):
    """One condition image through the DiT in write mode, exactly as diffusers' pipeline calls it."""
    kw = dict(
        hidden_states=latent,
        encoder_hidden_states=torch.zeros(1, 0, 24),
        prior_token_id=ids,
        prior_token_drop=torch.zeros_like(ids, dtype=torch.bool),
        timestep=torch.zeros(1),
        target_size=torch.tensor([[latent.shape[-2] * 8, latent.shape[-1] * 8]]),
        crop_coords=torch.zeros(1, 2),
    )
    if to_input is None:
        with torch.no_grad():
            model(**kw, kv_caches=cache)
    else:
        model(**{k: to_input(v) for k, v in kw.items()}, kv_caches=cache, return_dict=False)


@pytest.mark.parametrize(
    "images_per_sample,cached_samples,batch",
    [((1,), 1, 1), ((2,), 1, 3), ((1, 1), 2, 2), ((2, 2), 2, 2), ((1, 1), 2, 4), ((1, 1, 1), 3, 6)],
    ids=["one", "one-expanded", "per-sample", "per-sample-two-images", "repeat-2x", "repeat-3-to-6"],
)
def test_kv_cache_parity(models, images_per_sample, cached_samples, batch):
    torch_model, mlx_model = models["2x16"]
    n_layers = torch_model.config.num_layers
    t_cache, m_cache = ref.GlmImageKVCache(n_layers), GlmImageKVCache(n_layers)
    t_cache.set_mode("write")
    m_cache.set_mode("write")
    for sample in range(cached_samples):
        for _ in range(images_per_sample[sample] if sample < len(images_per_sample) else 1):
            latent = torch.randn(1, 4, 6, 8)
            ids = torch.randint(0, 50, (12,))
            condition_pass(torch_model, t_cache, latent, ids, None)
            condition_pass(mlx_model, m_cache, latent, ids, to_mx)
        t_cache.next_sample()
        m_cache.next_sample()

    kw = inputs(batch, 8, 8, 5, tiny_config(), timesteps=list(np.linspace(900, 10, batch)))
    for mode in ("read", "skip", None):
        t_cache.set_mode(mode)
        m_cache.set_mode(mode)
        got = run_mlx(mlx_model, kw, kv_caches=m_cache)
        want = run_torch(torch_model, kw, kv_caches=t_cache)
        assert_close(got, want, TOL, what=f"mode {mode}")
    # reading must change the result, or the cache would be untested
    m_cache.set_mode("read")
    assert rel_err(run_mlx(mlx_model, kw, kv_caches=m_cache), run_mlx(mlx_model, kw)) > 1e-3


def test_kv_cache_batch_mismatch_raises_like_diffusers(models):
    torch_model, mlx_model = models["2x16"]
    caches = [ref.GlmImageKVCache(2), GlmImageKVCache(2)]
    for cache, model, conv in zip(caches, (torch_model, mlx_model), (None, to_mx)):
        cache.set_mode("write")
        for _ in range(2):
            condition_pass(model, cache, torch.randn(1, 4, 6, 8), torch.randint(0, 50, (12,)), conv)
            cache.next_sample()
        cache.set_mode("read")
    kw = inputs(3, 8, 8, 5, tiny_config())
    message = "Cannot match 2 cached samples to batch size 3"
    with pytest.raises(ValueError, match=message):
        run_torch(torch_model, kw, kv_caches=caches[0])
    with pytest.raises(ValueError, match=message):
        run_mlx(mlx_model, kw, kv_caches=caches[1])


def test_kv_cache_modes_and_clear():
    cache = GlmImageKVCache(3)
    with pytest.raises(ValueError, match="Invalid mode"):
        cache.set_mode("append")
    cache.set_mode("write")
    assert all(c.mode == "write" for c in cache.caches)
    cache[0].store(mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)))
    cache.next_sample()
    assert cache[2].current_sample_idx == 1
    cache.clear()
    assert cache[0].k_caches == [] and cache[0].mode is None and cache[0].current_sample_idx == 0


def _graph_size(*arrays) -> int:
    """Number of unevaluated primitives behind the arrays (0 once they are evaluated)."""
    path = "/tmp/_mlx_glm_image_graph.dot"
    mx.export_to_dot(path, *arrays)
    return len(re.findall(r"shape=rectangle", open(path).read()))


def _cached(cache) -> list:
    return [a for c in cache.caches for a in (*c.k_caches, *c.v_caches)]


def test_kv_cache_is_lazy_and_computed_once(models):
    _, mlx_model = models["2x16"]
    cache = GlmImageKVCache(mlx_model.config.num_layers)
    cache.set_mode("write")
    condition_pass(mlx_model, cache, torch.randn(1, 4, 8, 8), torch.randint(0, 50, (16,)), to_mx)
    cache.next_sample()
    stored = _cached(cache)
    assert _graph_size(*stored) > 0, "writing must not force evaluation"

    cache.set_mode("read")
    kw = {k: to_mx(v) for k, v in inputs(1, 8, 8, 5, tiny_config()).items()}
    step1 = mlx_model(**kw, kv_caches=cache).sample
    step1_graph = _graph_size(step1)
    mx.eval(step1)
    assert _graph_size(*_cached(cache)) == 0, "the first reading step computes and keeps the condition K/V"
    assert all(a is b for a, b in zip(stored, _cached(cache))), "the cache holds the same arrays"

    step2 = mlx_model(**kw, kv_caches=cache).sample
    no_cache = mlx_model(**kw).sample
    # the second step's graph holds no condition pass: the size of a plain forward plus the concatenations
    assert _graph_size(step2) < step1_graph
    assert _graph_size(step2) - _graph_size(no_cache) <= 6 * mlx_model.config.num_layers
    assert_close(step2, step1, 1e-6, what="same step twice")


# ---------------------------------------------------------------------------------------------------------
# The pieces that are easy to get subtly wrong.


@pytest.mark.parametrize("h,w,head_dim", [(3, 5, 16), (4, 4, 8), (2, 7, 128)])
def test_rope_tables(h, w, head_dim):
    rope = ref.GlmImageRotaryPosEmbed(head_dim, patch_size=2)
    want_cos, want_sin = rope(torch.zeros(1, 4, 2 * h, 2 * w))
    cos, sin = rope_2d(h, w, head_dim)
    assert_close(cos, want_cos, 1e-6)
    assert_close(sin, want_sin, 1e-6)


@pytest.mark.parametrize("dim", [8, 33, 256, 512])
def test_sinusoidal_embedding(dim):
    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 999.0])
    want = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert_close(timestep_embedding(to_mx(t), dim), want, 1e-4)
    # Sizes reach 2048 rad, where one fp32 ulp of a frequency moves sin by ~1e-4: there, be at least as
    # close to the exact (float64) embedding as diffusers is.
    sizes = torch.tensor([1024.0, 1536.0, 2048.0])
    half = dim // 2
    args = sizes.double()[:, None] * torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    exact = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    exact = torch.nn.functional.pad(exact, (0, dim % 2))
    theirs = get_timestep_embedding(sizes, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert rel_err(timestep_embedding(to_mx(sizes), dim), exact) <= rel_err(theirs, exact) + 1e-6


def test_modulation_chunk_order():
    """Each of the 12 AdaLN chunks lands where diffusers' GlmImageAdaLayerNormZero puts it."""
    dim, emb_dim = 8, 6
    norm = ref.GlmImageAdaLayerNormZero(emb_dim, dim)
    torch.nn.init.normal_(norm.linear.weight)
    x, c, temb = torch.randn(2, 5, dim), torch.randn(2, 3, dim), torch.randn(2, emb_dim)
    with torch.no_grad():
        (x_mod, gate_msa, shift_mlp, scale_mlp, gate_mlp, c_mod, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = norm(x, c, temb)

    from mlx_glm_image.models.dit import GlmImageAdaLayerNormZero, _modulate

    ours = GlmImageAdaLayerNormZero(emb_dim, dim)
    ours.linear.weight = to_mx(norm.linear.weight)
    ours.linear.bias = to_mx(norm.linear.bias)
    chunks = ours(to_mx(temb))
    (shift_msa, c_shift_msa, scale_msa, c_scale_msa, g_msa, c_g_msa, s_mlp, c_s_mlp, sc_mlp, c_sc_mlp, g_mlp, c_g_mlp) = chunks
    assert_close(_modulate(to_mx(x), shift_msa, scale_msa), x_mod, 1e-5)
    assert_close(_modulate(to_mx(c), c_shift_msa, c_scale_msa), c_mod, 1e-5)
    for got, want in [
        (g_msa, gate_msa), (s_mlp, shift_mlp), (sc_mlp, scale_mlp), (g_mlp, gate_mlp),
        (c_g_msa, c_gate_msa), (c_s_mlp, c_shift_mlp), (c_sc_mlp, c_scale_mlp), (c_g_mlp, c_gate_mlp),
    ]:
        assert_close(got[:, 0], want, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Wrong inputs and loading.


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(hidden_states=torch.randn(1, 4, 7, 8)), r"latent size 7x8 is not divisible by the patch size 2"),
        (dict(hidden_states=torch.randn(1, 3, 8, 8)), r"3 channels, the model expects 4"),
        (dict(prior_token_id=torch.randint(0, 50, (1, 15))), r"15 tokens, a 8x8 latent needs 4x4 = 16"),
        (dict(encoder_hidden_states=torch.randn(1, 5, 23)), r"\(batch, text_len, 24\)"),
        (dict(hidden_states=torch.randn(4, 8, 8)), r"\(batch, 4, height, width\)"),
    ],
)
def test_wrong_inputs_raise(models, change, message):
    _, mlx_model = models["2x16"]
    kw = inputs(1, 8, 8, 5, tiny_config())
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        run_mlx(mlx_model, kw)


def test_from_pretrained_reads_shards_and_dtype(tmp_path):
    torch_model, _ = make_models(tmp_path, shard="20KB")
    folder = tmp_path / "transformer_2x16"
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    for dtype, want in [(None, mx.float32), ("float16", mx.float16), ("bfloat16", mx.bfloat16)]:
        model = load_model(GlmImageTransformer2DModel, folder, dtype=dtype)
        assert model.dtype == want
    model = load_model(GlmImageTransformer2DModel, tmp_path, subfolder="transformer_2x16")
    kw = inputs(1, 4, 4, 2, tiny_config())
    assert_close(run_mlx(model, kw), run_torch(torch_model, kw), TOL)


@pytest.mark.parametrize("steps_in_flight", [1, 2, 3])
def test_step_by_step_evaluation_gives_the_same_output(models, steps_in_flight):
    """The denoising loop's step hook (each block step scheduled, the one n-1 back waited for) changes when
    MLX evaluates, never what it computes."""
    torch_model, mlx_model = models["2x16"]
    kw = inputs(2, 8, 8, 5, tiny_config())
    mask = torch.ones(2, 5)
    mask[1, :3] = 0
    calls = []

    def hook():
        queued = queued_steps(steps_in_flight)
        return lambda x: calls.append(1) or queued(x)

    assert_close(run_mlx(mlx_model, kw, step_hook=hook()), run_torch(torch_model, kw), TOL)
    assert len(calls) == 2 * mlx_model.config.num_layers, "one call per block step"
    assert_close(run_mlx(mlx_model, kw, attention_mask=to_mx(mask), step_hook=hook()),
                 run_torch(torch_model, kw, attention_mask=mask), TOL)
    # a mask without padding: diffusers adds its +1 to every score, which softmax ignores
    full = torch.ones(2, 5)
    assert_close(run_mlx(mlx_model, kw, attention_mask=to_mx(full), step_hook=hook()),
                 run_torch(torch_model, kw, attention_mask=full), TOL)
    # the KV cache stays lazy and exact too (the write pass gets no hook)
    t_cache, m_cache = ref.GlmImageKVCache(2), GlmImageKVCache(2)
    for cache, model, conv in ((t_cache, torch_model, None), (m_cache, mlx_model, to_mx)):
        cache.set_mode("write")
        condition_pass(model, cache, LATENT_FIXED, IDS_FIXED, conv)
        cache.next_sample()
    for m in ("read", "skip"):
        t_cache.set_mode(m)
        m_cache.set_mode(m)
        assert_close(run_mlx(mlx_model, kw, kv_caches=m_cache, step_hook=hook()),
                     run_torch(torch_model, kw, kv_caches=t_cache), TOL, what=m)


def test_forward_under_compile_equals_eager(models):
    """Without a step hook the forward is one pure lazy graph: mx.compile traces it, and it equals both the
    eager forward and diffusers."""
    torch_model, mlx_model = models["4x8"]
    kw = inputs(2, 6, 10, 7, tiny_config())
    args = [to_mx(kw[k]) for k in ("hidden_states", "encoder_hidden_states", "prior_token_id", "prior_token_drop",
                                   "timestep", "target_size", "crop_coords")]
    compiled = mx.compile(lambda *a: mlx_model(*a, return_dict=False)[0], inputs=mlx_model.state)
    eager = mlx_model(*args, return_dict=False)[0]
    out = compiled(*args)
    assert_close(out, eager, 1e-6, what="compiled vs eager")
    assert_close(out, run_torch(torch_model, kw), TOL, what="compiled vs diffusers")
    kw2 = inputs(2, 6, 10, 7, tiny_config(), timesteps=[10.0, 20.0])  # traced once, new values
    assert_close(compiled(*[to_mx(kw2[k]) for k in ("hidden_states", "encoder_hidden_states", "prior_token_id",
                                                     "prior_token_drop", "timestep", "target_size", "crop_coords")]),
                 run_torch(torch_model, kw2), TOL, what="compiled, second call")


@pytest.mark.parametrize("drop", [False, True])
def test_one_prior_id_broadcast_over_the_grid(models, drop):
    """diffusers' own DiT test passes prior_token_id and prior_token_drop of shape (1,): one id for every token."""
    torch_model, mlx_model = models["2x16"]
    kw = inputs(2, 8, 6, 4, tiny_config())
    kw["prior_token_id"] = torch.tensor([7])
    kw["prior_token_drop"] = torch.tensor([drop])
    assert_close(run_mlx(mlx_model, kw), run_torch(torch_model, kw), TOL)


def test_return_dict_like_diffusers(models):
    torch_model, mlx_model = models["2x16"]
    kw = {k: to_mx(v) for k, v in inputs(1, 4, 4, 2, tiny_config()).items()}
    out = mlx_model(**kw)
    assert_close(out.sample, mlx_model(**kw, return_dict=False)[0], 0)


LATENT_FIXED = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(11))
IDS_FIXED = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(12))


def test_embed_blocks_head_compose_to_the_forward(models):
    """The public pieces are the forward: embed -> each block on its own -> head gives __call__'s output bit for
    bit (and so diffusers'), and a block alone changes the sequence (it is not a no-op)."""
    torch_model, mlx_model = models["3x32"]
    kw = {k: to_mx(v) for k, v in inputs(2, 6, 10, 7, tiny_config()).items()}
    x, context = mlx_model.embed(**kw)
    assert x.shape == (2, 7 + 3 * 5, mlx_model.config.inner_dim) and context.text_len == 7 and context.grid == (3, 5)
    first = mlx_model.block(0, x, context)
    assert rel_err(first, x) > 1e-2
    h = first
    for i in range(1, mlx_model.config.num_layers):
        h = mlx_model.block(i, h, context)
    out = mlx_model.head(h, context)
    assert np.array_equal(np.array(out), np.array(mlx_model(**kw, return_dict=False)[0]))
    assert_close(out, run_torch(torch_model, {k: torch.from_numpy(np.array(v)) for k, v in kw.items()}), TOL)


def test_kv_cache_mode_per_call_equals_set_mode(models):
    """The pipeline passes the cache mode per call; the cache's own mode (diffusers' set_mode) is never read then."""
    _, mlx_model = models["2x16"]
    per_call, by_mode = GlmImageKVCache(2), GlmImageKVCache(2)
    by_mode.set_mode("write")
    for cache, mode in ((per_call, "write"), (by_mode, None)):
        mlx_model(to_mx(LATENT_FIXED), mx.zeros((1, 0, 24)), to_mx(IDS_FIXED), mx.zeros((12,), mx.bool_), mx.zeros((1,)),
                  mx.array([[48.0, 64.0]]), mx.zeros((1, 2)), kv_caches=cache, kv_cache_mode=mode)
        cache.next_sample()
    assert all(c.mode is None for c in per_call.caches), "a per-call mode leaves the cache's own alone"
    kw = {k: to_mx(v) for k, v in inputs(1, 8, 8, 5, tiny_config()).items()}
    for mode in ("read", "skip"):
        by_mode.set_mode(mode)
        got = mlx_model(**kw, kv_caches=per_call, kv_cache_mode=mode).sample
        assert np.array_equal(np.array(got), np.array(mlx_model(**kw, kv_caches=by_mode).sample)), mode
    with pytest.raises(ValueError, match="Invalid mode"):
        mlx_model(**kw, kv_caches=per_call, kv_cache_mode="append")
