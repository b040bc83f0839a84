"""Glyph text encoder: quoted strings of the prompt -> ByT5 bytes -> T5 encoder (transformers' T5EncoderModel).

Mirrors diffusers' GlmImagePipeline.get_glyph_texts / _get_glyph_embeds and transformers' ByT5Tokenizer and
T5EncoderModel; parameter names equal transformers', so a `text_encoder/` folder loads as is.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .weights import config_from_dict, load_into, read_config, resolve, to_dtype

# ---------------------------------------------------------------------------------------------------------
# Glyph strings


def get_glyph_texts(prompt: str | list[str]) -> list[list[str]]:
    """The quoted substrings of each prompt, in the pipeline's order: '...', then \u201c...\u201d, "...", 「...」."""
    if isinstance(prompt, str):
        prompt = [prompt]
    out = []
    for p in prompt:
        out.append(
            re.findall(r"'([^']*)'", p)
            + re.findall(r"\u201c([^\u201c\u201d]*)\u201d", p)
            + re.findall(r'"([^"]*)"', p)
            + re.findall(r"「([^「」]*)」", p)
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# ByT5 tokenizer (bytes + 3; no vocabulary file needed)


@dataclass(frozen=True)
class _Special:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False


class ByT5Tokenizer:
    """transformers' ByT5Tokenizer for encoding: utf-8 bytes + 3, ``</s>`` (1) appended, ``<pad>`` 0.

    Literal special-token strings in the text (``</s>``, ``<pad>``, ``<unk>``, ``<extra_id_N>``) map to their
    ids as transformers does, with the whitespace stripping of pad/eos/unk.
    """

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    offset = 3

    def __init__(self, extra_ids: int = 125, specials: list[_Special] | None = None):
        if specials is None:
            specials = [
                _Special("<pad>", 0, True, True),
                _Special("</s>", 1, True, True),
                _Special("<unk>", 2, True, True),
            ] + [_Special(f"<extra_id_{i}>", 259 + i) for i in range(extra_ids)]
        self.specials = {s.content: s for s in specials}
        # Longest first so that no token shadows a longer one starting at the same place.
        names = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "ByT5Tokenizer":
        """Read the added tokens of a ``tokenizer/`` folder's tokenizer_config.json (defaults when absent)."""
        path = Path(folder) / "tokenizer_config.json"
        if not path.is_file():
            return cls()
        cfg = json.loads(path.read_text())
        decoder = cfg.get("added_tokens_decoder")
        if not decoder:
            return cls(extra_ids=int(cfg.get("extra_ids", 125)))
        specials = [
            _Special(t["content"], int(i), bool(t.get("lstrip", False)), bool(t.get("rstrip", False)))
            for i, t in decoder.items()
        ]
        return cls(specials=specials)

    def tokenize_ids(self, text: str) -> list[int]:
        if self._split is None:
            return [b + self.offset for b in text.encode("utf-8")]
        pieces = self._split.split(text)  # odd indices are special tokens
        for i in range(1, len(pieces), 2):
            tok = self.specials[pieces[i]]
            if tok.lstrip and i > 0:
                pieces[i - 1] = pieces[i - 1].rstrip()
            if tok.rstrip and i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.specials[piece].id)
            elif piece:
                ids.extend(b + self.offset for b in piece.encode("utf-8"))
        return ids

    def encode(self, text: str, max_length: int | None = None, truncation: bool = False) -> list[int]:
        ids = self.tokenize_ids(text)
        if truncation and max_length is not None:
            if max_length < 1:
                raise ValueError(f"max_length must be >= 1, got {max_length}")
            # room for the eos, as prepare_for_model does (num_special_tokens_to_add = 1)
            ids = ids[: max(max_length - 1, 0)]
        # ByT5 does not add a second eos when the text already ends with one
        if not ids or ids[-1] != self.eos_token_id:
            ids = ids + [self.eos_token_id]
        return ids

    def __call__(self, texts: str | list[str], max_length: int | None = None, truncation: bool = False):
        if isinstance(texts, str):
            return self.encode(texts, max_length, truncation)
        return [self.encode(t, max_length, truncation) for t in texts]


# ---------------------------------------------------------------------------------------------------------
# T5 encoder


@dataclass
class T5Config:
    vocab_size: int = 384
    d_model: int = 1472
    d_kv: int = 64
    d_ff: int = 3584
    num_layers: int = 12
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    # Not read from config.json: derived from feed_forward_proj as transformers' T5Config does.
    dense_act_fn: str = ""
    is_gated_act: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        return config_from_dict(cls, d, exclude=("dense_act_fn", "is_gated_act"))

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not 'gated-{{ACT}}' or '{{ACT}}'")
        self.is_gated_act = parts[0] == "gated"
        self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if self.dense_act_fn not in _ACTIVATIONS:
            raise ValueError(f"unsupported T5 activation {self.dense_act_fn!r}")


def _gelu_new(x):
    # transformers' NewGELUActivation (tanh approximation), written out so it is exactly that formula
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * mx.power(x, 3))))


_ACTIVATIONS = {
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_new,
    "gelu": nn.gelu,
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


class T5LayerNorm(nn.Module):
    """Scale-only RMS norm, statistics in float32 (T5's)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        # transformers: x * rsqrt(mean(x.float()**2)) then cast to the weight dtype when it is half precision
        y = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps)
        return self.weight * y.astype(self.weight.dtype)


def _relative_position_bucket(relative_position: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    # Bidirectional (encoder) form of transformers' T5Attention._relative_position_bucket.
    num_buckets //= 2
    buckets = (relative_position > 0).astype(mx.int32) * num_buckets
    n = mx.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 log like torch's .float(); n == 0 only where is_small, the -inf there is discarded by where
    large = max_exact + (
        mx.log(n.astype(mx.float32) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(mx.int32)
    large = mx.minimum(large, num_buckets - 1)
    return buckets + mx.where(is_small, n, large)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.n_heads = config.num_heads
        self.d_kv = config.d_kv
        inner = config.num_heads * config.d_kv
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def compute_bias(self, length: int) -> mx.array:
        pos = mx.arange(length)
        rel = pos[None, :] - pos[:, None]  # memory - query, (L, L)
        buckets = _relative_position_bucket(rel, self.num_buckets, self.max_distance)
        values = self.relative_attention_bias(buckets)  # (L, L, H)
        return values.transpose(2, 0, 1)[None]  # (1, H, L, L)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        # float32 attention: torch's CPU/GPU SDPA kernels accumulate half inputs in float32, and doing the same
        # keeps us as close to the reference under bfloat16 (2.5x closer than bf16 scores on the tests' model).
        q, k, v = (
            p(x).reshape(B, L, self.n_heads, self.d_kv).transpose(0, 2, 1, 3).astype(mx.float32)
            for p in (self.q, self.k, self.v)
        )
        # T5 does not scale the scores; the relative bias and the padding mask are one additive mask
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias)
        return self.o(out.astype(x.dtype).transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = _ACTIVATIONS[config.dense_act_fn]

    def __call__(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        # transformers keeps wo in float32 under float16 (_keep_in_fp32_modules) and casts into it
        return self.wo(h.astype(self.wo.weight.dtype))


class T5DenseActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = _ACTIVATIONS[config.dense_act_fn]

    def __call__(self, x):
        return self.wo(self.act(self.wi(x)).astype(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x):
        # no cast back: with a float32 wo under float16, transformers' residual stream turns float32 too
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]

    def __call__(self, x, bias):
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


def _clamp_fp16(x):
    # transformers clamps float16 activations so that an inf does not spread through the residual stream
    if x.dtype != mx.float16:
        return x
    big = mx.where(mx.isinf(x).any(), 65504.0 - 1000.0, 65504.0).astype(mx.float16)
    return mx.clip(x, -big, big)


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        # The bias table lives in the first block only and is shared by all blocks.
        self.block = [T5Block(config, has_relative_attention_bias=(i == 0)) for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, h: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        L = h.shape[1]
        bias = self.block[0].layer[0].SelfAttention.compute_bias(L).astype(mx.float32)  # (1, H, L, L)
        if attention_mask is not None:
            # additive key mask, torch's finfo(float32).min as transformers' eager/sdpa path adds
            neg = mx.array(mx.finfo(mx.float32).min, mx.float32)
            key_mask = mx.where(attention_mask[:, None, None, :].astype(mx.bool_), 0.0, neg)
            bias = bias + key_mask  # (B, H, L, L)
        for block in self.block:
            h = block(h, bias)
        return self.final_layer_norm(h)


class T5EncoderModel(nn.Module):
    """transformers' T5EncoderModel (encoder stack only), ``__call__`` returns ``last_hidden_state``."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        return self.encoder(self.shared(input_ids), attention_mask)

    @property
    def dtype(self) -> mx.Dtype:
        return self.shared.weight.dtype

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop tied copies of the embedding (and any decoder / lm_head of a full T5 checkpoint)."""
        out = {}
        for k, v in weights.items():
            if k.startswith(("decoder.", "lm_head.")):
                continue
            if k == "encoder.embed_tokens.weight":
                out.setdefault("shared.weight", v)
                continue
            out[k] = v
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=None, subfolder: str | None = None) -> "T5EncoderModel":
        folder = resolve(path, subfolder)
        if subfolder is None and not (folder / "config.json").is_file() and (folder / "text_encoder").is_dir():
            folder = folder / "text_encoder"
        config = read_config(folder)
        model = cls(T5Config.from_dict(config))
        load_into(model, folder, config, dtype=dtype, sanitize=cls.sanitize)
        if model.dtype == mx.float16 and not config.get("quantization"):
            # as transformers does for T5 under float16 only (_keep_in_fp32_modules = ["wo"]): wo stays float32
            for block in model.encoder.block:
                ff = block.layer[1].DenseReluDense
                ff.wo.weight = ff.wo.weight.astype(mx.float32)
        mx.eval(model.parameters())
        return model


# ---------------------------------------------------------------------------------------------------------
# Glyph embeddings (diffusers' GlmImagePipeline._get_glyph_embeds)


def get_glyph_embeds(
    text_encoder: T5EncoderModel,
    prompts: str | list[str],
    max_sequence_length: int = 2048,
    dtype=None,
    tokenizer: ByT5Tokenizer | None = None,
) -> mx.array:
    """(B, L, d_model): per prompt, the encoder states of all its glyph strings' tokens, concatenated,
    left-padded with zeros to the batch's longest."""
    tokenizer = tokenizer or ByT5Tokenizer()
    dtype = to_dtype(dtype) or text_encoder.dtype
    embeds = []
    for glyph_texts in get_glyph_texts(prompts):
        if len(glyph_texts) == 0:
            glyph_texts = [""]
        ids = tokenizer(glyph_texts, max_length=max_sequence_length, truncation=True)
        # diffusers' quirk: one pad token in front of every string when the NUMBER of strings is even
        ids = [[tokenizer.pad_token_id] * ((len(ids) + 1) % 2) + x for x in ids]
        longest = max(len(x) for x in ids)
        mask = mx.array([[1] * len(x) + [0] * (longest - len(x)) for x in ids], dtype=mx.int32)
        tokens = mx.array([x + [tokenizer.pad_token_id] * (longest - len(x)) for x in ids], dtype=mx.int32)
        hidden = text_encoder(tokens, attention_mask=mask)  # (n_strings, longest, d)
        # keep the unmasked positions, row by row, in order (= last_hidden_state[mask.bool()])
        kept = [hidden[i, : len(x)] for i, x in enumerate(ids)]
        emb = mx.concatenate(kept, axis=0)[None]
        mx.eval(emb)
        embeds.append(emb)
    longest = max(e.shape[1] for e in embeds)
    padded = [
        mx.concatenate([mx.zeros((1, longest - e.shape[1], e.shape[2]), e.dtype), e], axis=1)
        if e.shape[1] < longest
        else e
        for e in embeds
    ]
    return mx.concatenate(padded, axis=0).astype(dtype)
