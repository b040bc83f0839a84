"""Glyph encoder parity: get_glyph_texts / ByT5 bytes / T5 encoder / _get_glyph_embeds vs diffusers + transformers."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import assert_close, rel_err

from mlx_glm_image.loading import load_model
from mlx_glm_image.models.t5 import T5Config, T5EncoderModel
from mlx_glm_image.pipeline.glyphs import ByT5Tokenizer, get_glyph_embeds, get_glyph_texts, glyph_tokens

transformers = pytest.importorskip("transformers")
from diffusers import GlmImagePipeline  # noqa: E402

PROMPTS = [
    "a cat on a mat",  # no quotes -> [""]
    "a sign that says 'OPEN'",  # one
    'a poster: "GLM-Image" and \u201cZ.ai\u201d',  # two (pad quirk)
    "three: 'one' \"two\" 「三つ目」",  # three
    # four, non-ASCII: accents, CJK, emoji
    "caf\u00e9 'cr\u00e8me br\u00fbl\u00e9e' \u201c\u4f60\u597d\uff0c\u4e16\u754c\u201d"
    " \"emoji \U0001f600\U0001f389\" 'na\u00efve'",
    "empty quotes '' and \"\"",  # two empty strings
    "'" + "long glyph text with many bytes, " * 6 + "'",  # > max_distance / bucket range
]


def tiny_config(**kw):
    cfg = dict(
        vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False,
        use_cache=False, dropout_rate=0.0,
    )
    cfg.update(kw)
    return transformers.T5Config(**cfg)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(tiny_config()).eval()
    with torch.no_grad():
        # larger-than-init weights so that every part of the math moves the output
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if name == "shared.weight" else p.shape[-1] ** -0.5))
    folder = tmp_path_factory.mktemp("t5")
    ref.save_pretrained(folder, safe_serialization=True)
    ours = load_model(T5EncoderModel, folder)
    return ref, ours, folder


def ref_pipeline_self(ref_model):
    ns = SimpleNamespace(
        tokenizer=transformers.ByT5Tokenizer(), text_encoder=ref_model, _execution_device=torch.device("cpu")
    )
    ns.get_glyph_texts = lambda p: GlmImagePipeline.get_glyph_texts(ns, p)
    return ns


def test_get_glyph_texts_matches_pipeline():
    prompts = PROMPTS + ["nested 'a \"b\" c' \u201cx'y\u201d", "unbalanced 'open and \"half", "「」 \u201c\u201d"]
    assert get_glyph_texts(prompts) == GlmImagePipeline.get_glyph_texts(None, prompts)
    assert get_glyph_texts("say 'hi'") == [["hi"]]


@pytest.mark.parametrize("max_length", [2048, 1, 2, 5, 17])
def test_tokenizer_matches_byt5(max_length):
    ref = transformers.ByT5Tokenizer()
    ours = ByT5Tokenizer()
    texts = [
        "", "a", "hello world", "caf\u00e9 \u4f60\u597d \U0001f600", "ab</s>", "</s>", "x</s>y", "a </s>  b\t<pad>\nc",
        "<extra_id_0>z<extra_id_124>", "<extra_id_125>", "<unk >", " leading and trailing ", "a\u3000</s>\u00a0b",
        "\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9", "<EXTRA_ID_1>",
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(texts, max_length=max_length, truncation=True).input_ids
    assert ours(texts, max_length=max_length, truncation=True) == expected
    assert ours("abc") == [100, 101, 102, 1]


def test_t5_encoder_matches_transformers(models):
    ref, ours, _ = models
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 259, (3, 150), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    mask[2, 7:] = 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).last_hidden_state
    actual = ours(mx.array(ids.numpy()), mx.array(mask.numpy()))
    keep = mask.bool().numpy()
    err = assert_close(np.array(actual)[keep], expected.numpy()[keep], what="T5 hidden states (unmasked)")
    print(f"T5 encoder rel err {err:.2e}")
    # also without a mask
    with torch.no_grad():
        expected = ref(ids[:1, :40]).last_hidden_state
    assert_close(ours(mx.array(ids[:1, :40].numpy())), expected, what="T5 hidden states (no mask)")


@pytest.mark.parametrize(
    "batch",
    [[p] for p in PROMPTS] + [PROMPTS[:4], PROMPTS[2:5][::-1], ["no quotes at all", "two 'a' 'bb'"]],
    ids=lambda b: f"{len(b)}prompts:" + "|".join(p[:12] for p in b),
)
def test_glyph_embeds_equal_pipeline(models, batch):
    ref, ours, _ = models
    with torch.no_grad():
        expected = GlmImagePipeline._get_glyph_embeds(ref_pipeline_self(ref), batch, 2048, None, None)
    actual = get_glyph_embeds(ours, batch)
    assert actual.shape == tuple(expected.shape)
    err = assert_close(actual, expected, what="glyph embeds")
    print(f"glyph embeds {len(batch)} prompts: rel err {err:.2e}")
    # the left padding is exact zeros where the reference has them
    np.testing.assert_array_equal(np.array(actual) == 0, expected.numpy() == 0)


def test_glyph_embeds_truncation(models):
    ref, ours, _ = models
    batch = ["'" + "x" * 40 + "' and 'short'", "only 'one'"]
    with torch.no_grad():
        expected = GlmImagePipeline._get_glyph_embeds(ref_pipeline_self(ref), batch, 16, None, None)
    actual = get_glyph_embeds(ours, batch, max_sequence_length=16)
    assert actual.shape == tuple(expected.shape)
    assert_close(actual, expected, what="truncated glyph embeds")


@pytest.mark.parametrize("prompt", PROMPTS[:4], ids=["none", "one", "two", "three"])
def test_glyph_token_count_is_the_reference_length(models, prompt):
    # glyph_tokens (what the request checks against max_sequence_length) counts the rows diffusers' glyph embeds
    # have; with an even number of strings that includes diffusers' pad in front of each, which plain ByT5 lacks
    ref, _, _ = models
    with torch.no_grad():
        expected = GlmImagePipeline._get_glyph_embeds(ref_pipeline_self(ref), [prompt], 2048, None, None)
    assert glyph_tokens(prompt) == expected.shape[1]
    texts = get_glyph_texts(prompt)[0] or [""]
    pads = len(texts) if len(texts) % 2 == 0 else 0
    assert expected.shape[1] == sum(map(len, transformers.ByT5Tokenizer()(texts).input_ids)) + pads


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_load_close(models, dtype):
    ref, _, folder = models
    ours16 = load_model(T5EncoderModel, folder, dtype=dtype)
    ref16 = transformers.T5EncoderModel.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    # transformers keeps wo in float32 under float16 only; so do we
    wo_ref = ref16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    wo_ours = ours16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert str(wo_ref).split(".")[-1] == str(wo_ours).split(".")[-1]
    batch = [PROMPTS[2], PROMPTS[4]]
    with torch.no_grad():
        expected = GlmImagePipeline._get_glyph_embeds(ref_pipeline_self(ref16), batch, 2048, None, None)
        exact = GlmImagePipeline._get_glyph_embeds(ref_pipeline_self(ref), batch, 2048, None, None)
    actual = get_glyph_embeds(ours16, batch)
    assert str(actual.dtype).split(".")[-1] == str(expected.dtype).split(".")[-1]
    # half precision: judge both against the float32 reference; ours must be no worse than torch's own rounding
    err, ref_err = rel_err(actual, exact), rel_err(expected, exact)
    print(f"{dtype} glyph embeds: ours vs fp32 {err:.2e}, torch {dtype} vs fp32 {ref_err:.2e}")
    assert err <= 2 * ref_err + 1e-3


def test_sanitize_and_config():
    w = {"shared.weight": mx.ones((2, 2)), "encoder.embed_tokens.weight": mx.ones((2, 2)), "decoder.x": mx.ones(1)}
    assert set(T5EncoderModel.sanitize(w)) == {"shared.weight"}
    only_tied = {"encoder.embed_tokens.weight": mx.zeros((2, 2))}
    assert set(T5EncoderModel.sanitize(only_tied)) == {"shared.weight"}
    cfg = T5Config.from_dict({"d_model": 8, "feed_forward_proj": "gated-gelu", "unknown": 3, "dense_act_fn": "relu"})
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
    assert T5Config.from_dict({"feed_forward_proj": "relu"}).is_gated_act is False
    with pytest.raises(ValueError):
        T5Config.from_dict({"feed_forward_proj": "gated-nope"})


def test_parameter_names_match_transformers(models):
    from mlx.utils import tree_flatten

    ref, ours, _ = models
    ref_names = {k for k in ref.state_dict() if k != "encoder.embed_tokens.weight"}
    assert {k for k, _ in tree_flatten(ours.parameters())} == ref_names


def test_bad_input(models):
    _, ours, _ = models
    with pytest.raises(ValueError):
        ours(mx.zeros((4,), mx.int32))
    with pytest.raises(ValueError):
        ours(mx.zeros((1, 4), mx.int32), mx.ones((1, 5), mx.int32))
