"""The ByT5 glyph encoder: transformers' T5EncoderModel (encoder stack only) in MLX.

Parameter names equal transformers', so a ``text_encoder/`` folder loads as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .activations import ACTIVATIONS, activation
from .base import PretrainedModel, config_from_dict

# ---------------------------------------------------------------------------------------------------------
# T5 encoder


@dataclass
class T5Config:
    # Defaults: transformers' T5Config (what it reads when a key is absent), as every config class here; the
    # released values (ByT5's geometry) are in released.py.
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
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
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"unsupported T5 activation {self.dense_act_fn!r}")


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
        self.act = activation(config.dense_act_fn)

    def __call__(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        # transformers keeps wo in float32 under float16 (_keep_in_fp32_modules) and casts into it
        return self.wo(h.astype(self.wo.weight.dtype))


class T5DenseActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn)

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


class T5EncoderModel(PretrainedModel):
    """transformers' T5EncoderModel (encoder stack only), ``__call__`` returns ``last_hidden_state``."""

    component = "text_encoder"
    config_class = T5Config
    full_precision_note = "ByT5 is small (0.9 GB) and decides the rendered glyphs"

    def __init__(self, config: T5Config | dict | None = None):
        super().__init__()
        self.config = config = self.as_config(config)
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

    def after_load(self):
        if self.dtype == mx.float16:
            # as transformers does for T5 under float16 only (_keep_in_fp32_modules = ["wo"]): wo stays float32
            for block in self.encoder.block:
                ff = block.layer[1].DenseReluDense
                if type(ff.wo) is nn.Linear:
                    ff.wo.weight = ff.wo.weight.astype(mx.float32)
