"""Gradient checkpointing per block (train/memory.py): the loss and every adapter gradient with the blocks
checkpointed equal those without (fp32, 1e-6 relative), for the AR prior model and the DiT, with adapters inside
the blocks and outside them (their gradients cross the checkpoints as its inputs), and for the DiT's editing
passes, which write and read a KV cache; only the instances given change class, and only until
``uncheckpoint_blocks``."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import assert_close
from mlx.utils import tree_flatten

from mlx_glm_image import GlmImageTransformer2DModel, load_model, lora
from mlx_glm_image.models.ar import GlmImageForConditionalGeneration
from mlx_glm_image.models.ar.text_model import GlmImageTextDecoderLayer
from mlx_glm_image.models.dit import GlmImageKVCache, GlmImageTransformerBlock
from mlx_glm_image.pipeline.processor import GlmImageProcessor
from mlx_glm_image.scheduler import SchedulerConfig
from mlx_glm_image.train import dit as train_dit
from mlx_glm_image.train.ar import ar_example, ar_loss, causal_lm_loss
from mlx_glm_image.train.memory import checkpoint_blocks, evaluate_step, is_checkpointed, uncheckpoint_blocks

H, W = 64, 96
# the blocks' linear layers, and some outside them: the vision head after the decoder layers; the DiT's glyph
# projector before its blocks and its time embedder, which every block's modulation reads
AR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
DIT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear",
               "glyph_projector.net.2", "timestep_embedder.linear_2")


def with_adapters(model, targets, seed=0):
    """``model`` with trainable rank-4 adapters, B random so that every A has a gradient."""
    lora.add_trainable(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=targets), mx.random.key(seed))
    rng = np.random.default_rng(seed)
    modules = dict(model.named_modules())
    for path, (_, b) in lora.trained(model).items():
        modules[path].lora_B = mx.array(0.2 * rng.standard_normal(b.shape).astype(np.float32))
    mx.eval(model.trainable_parameters())
    return model


def step(model, blocks, loss_fn):
    """(loss, gradients by path) of one step, evaluated as the training step evaluates them."""
    loss, grads = nn.value_and_grad(model, loss_fn)()
    evaluate_step(loss, grads, model, blocks)
    return loss, dict(tree_flatten(grads))


def assert_same_step(model, blocks, loss_fn, n_grads):
    loss, grads = step(model, blocks, loss_fn)
    checkpoint_blocks(blocks)
    try:
        assert all(is_checkpointed(b) for b in blocks)
        ck_loss, ck_grads = step(model, blocks, loss_fn)
    finally:
        uncheckpoint_blocks(blocks)
    assert len(grads) == n_grads and sorted(ck_grads) == sorted(grads)
    assert_close(ck_loss, loss, tol=1e-6, what="loss")
    for key, g in grads.items():
        assert float(mx.abs(g).max()) > 0, f"{key} has no gradient"
        assert_close(ck_grads[key], g, tol=1e-6, what=key)


# ---- the AR prior model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prior(model_dir):
    model = load_model(GlmImageForConditionalGeneration, model_dir)
    proc = GlmImageProcessor.from_pretrained(model_dir)
    codes = np.random.default_rng(0).integers(0, 64, (H // 32, W // 32))
    return with_adapters(model, AR_TARGETS), ar_example(model, proc, "a red cat on the mat", codes, H, W)


def test_ar_loss_and_every_gradient_equal_without_checkpointing(prior):
    model, example = prior
    layers = model.model.language_model.layers
    n = len(layers) * 6 * 2 + 2
    assert_same_step(model, layers, lambda: ar_loss(model, example), n)


def test_ar_padded_batch_equals_without_checkpointing(prior):
    """Left padding: the decoder layers get a boolean mask array (no gradient) besides the rotary tables."""
    model, example = prior
    ids, pos, labels = (mx.array(a) for a in (example.input_ids, example.position_ids, example.labels))
    pad = 3
    batch_ids = mx.concatenate([ids, mx.pad(ids[:, :-pad], [(0, 0), (pad, 0)])])
    batch_pos = mx.concatenate([pos, mx.pad(pos[..., :-pad], [(0, 0), (0, 0), (pad, 0)])], axis=1)
    mask = mx.concatenate([mx.ones(ids.shape), (mx.arange(ids.shape[1]) >= pad)[None].astype(mx.float32)])
    batch_labels = mx.concatenate([labels, mx.pad(labels[:, :-pad], [(0, 0), (pad, 0)], constant_values=-100)])

    def loss_fn():
        return causal_lm_loss(model(batch_ids, attention_mask=mask, position_ids=batch_pos), batch_labels)

    layers = model.model.language_model.layers
    assert_same_step(model, layers, loss_fn, len(layers) * 6 * 2 + 2)


# ---- the DiT --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit(model_dir):
    model = with_adapters(load_model(GlmImageTransformer2DModel, model_dir, dtype="float32"), DIT_TARGETS)
    scheduler = SchedulerConfig.from_dict(json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text()))
    rng = np.random.default_rng(1)
    c = model.config
    rows, cols = c.token_grid(H // 8, W // 8)
    batch = train_dit.DitBatch(
        latents=mx.array(rng.standard_normal((1, c.in_channels, H // 8, W // 8)).astype(np.float32)),
        prior_token_ids=mx.array(rng.integers(0, c.prior_vq_quantizer_codebook_size, (1, rows * cols)), mx.int32),
        prompt_embeds=mx.array(rng.standard_normal((1, 7, c.text_embed_dim)).astype(np.float32)),
        negative_prompt_embeds=mx.array(rng.standard_normal((1, 1, c.text_embed_dim)).astype(np.float32)),
        target_size=mx.array([[H, W]], mx.float32), crop_coords=mx.zeros((1, 2)))
    return model, train_dit.training_sampler(scheduler, model, batch.latents), batch


@pytest.mark.parametrize("drop", [False, True])
def test_dit_loss_and_every_gradient_equal_without_checkpointing(dit, drop):
    model, sampler, batch = dit
    d = train_dit.draw(sampler, batch, mx.random.key(3), drop_probability=float(drop))
    assert d.drop == drop
    n = len(model.transformer_blocks) * 7 * 2 + 2 * 2
    assert_same_step(model, model.transformer_blocks, lambda: train_dit.flow_matching_loss(model, sampler, batch, d), n)


def test_dit_editing_passes_with_a_kv_cache_keep_every_gradient(dit):
    """A condition pass writes the KV cache and the denoising pass reads it, in one loss: with the blocks
    checkpointed the gradients (through the cached keys and values too) are the same, and each layer's cache holds
    the condition's keys once (a recomputed writing pass would store them again)."""
    model, _, batch = dit
    condition = mx.random.normal(batch.latents.shape, key=mx.random.key(5))
    caches = []

    def loss_fn():
        cache = GlmImageKVCache(model.config.num_layers)
        caches.append(cache)
        n = batch.prior_token_ids.shape[1]
        no_text = mx.zeros((1, 0, model.config.text_embed_dim))
        model(condition, no_text, batch.prior_token_ids[0], mx.zeros((n,), mx.bool_), mx.zeros((1,)), batch.target_size,
              batch.crop_coords, kv_caches=cache, kv_cache_mode="write")
        v = model(batch.latents, timestep=mx.array([500.0]), kv_caches=cache, kv_cache_mode="read", return_dict=False,
                  **train_dit.dit_inputs(batch, False))[0]
        return mx.mean(mx.square(v))

    assert_same_step(model, model.transformer_blocks, loss_fn, len(model.transformer_blocks) * 7 * 2 + 2 * 2)
    n = batch.prior_token_ids.shape[1]
    assert [[c.k_caches[0].shape[2] for c in cache.caches] for cache in caches] == [[n] * len(caches[0].caches)] * 2


# ---- which instances ------------------------------------------------------------------------------------
def test_only_the_given_instances_change_and_only_until_uncheckpointed(model_dir):
    ours, other = (with_adapters(load_model(GlmImageTransformer2DModel, model_dir), DIT_TARGETS) for _ in range(2))
    prior = load_model(GlmImageForConditionalGeneration, model_dir)
    params = sorted(k for k, _ in tree_flatten(ours.parameters()))
    adapters = sorted(lora.trained(ours))
    blocks, layers = ours.transformer_blocks, prior.model.language_model.layers
    checkpoint_blocks(blocks[:1] + layers)
    checkpoint_blocks(blocks)  # again, and the rest: one subclass per class, never a subclass of it
    try:
        assert len({type(b) for b in blocks}) == 1 and type(blocks[0]).__base__ is GlmImageTransformerBlock
        assert isinstance(blocks[0], GlmImageTransformerBlock)
        assert len({type(x) for x in layers}) == 1 and type(layers[0]).__base__ is GlmImageTextDecoderLayer
        assert all(type(b) is GlmImageTransformerBlock for b in other.transformer_blocks)
        assert sorted(k for k, _ in tree_flatten(ours.parameters())) == params
        assert sorted(lora.trained(ours)) == adapters
    finally:
        uncheckpoint_blocks(blocks + layers)
    assert all(type(b) is GlmImageTransformerBlock for b in blocks)
    assert all(type(x) is GlmImageTextDecoderLayer for x in layers)
    uncheckpoint_blocks(blocks)  # a block not checkpointed stays as it is
    assert all(type(b) is GlmImageTransformerBlock for b in blocks)
