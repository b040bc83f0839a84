"""The GLM-4-style text decoder of the AR prior model (transformers' ``GlmImageTextModel``) and its KV cache.

Per layer: four RMSNorms (input, post-self-attention, post-attention, post-MLP), GQA attention with QKV bias,
a fused gate/up SwiGLU, and M-RoPE: the first ``rotary_dim`` channels of each head are rotated rotate-half style,
with each frequency reading the temporal, height or width position as ``mrope_section`` assigns.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig


class KVCache:
    """Keys/values of one layer in a buffer of the generation's final length, written at ``offset``.

    The offset is an array, and attention reads the first ``window`` positions under a mask of those written so
    far: the decode steps of one window have the same shapes, so the loop compiles a step once per window
    (``mx.compile``) instead of building its graph op by op for every token. The buffer is allocated at the
    first update.
    """

    def __init__(self, max_size: int, keys: mx.array | None = None, values: mx.array | None = None,
                 offset: mx.array | None = None, window: int | None = None):
        self.max_size = max_size
        self.keys = keys
        self.values = values
        self.offset = mx.array(0, dtype=mx.int32) if offset is None else offset
        self.window = window or max_size  # at least offset + the tokens of the next update

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values, self.offset]

    @classmethod
    def from_state(cls, state: list[mx.array], window: int | None = None) -> KVCache:
        keys, values, offset = state
        return cls(keys.shape[2], keys, values, offset, window)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            B, H, _, D = keys.shape
            self.keys = mx.zeros((B, H, self.max_size, D), keys.dtype)
            self.values = mx.zeros((B, H, self.max_size, values.shape[-1]), values.dtype)
        start = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        self.offset = self.offset + keys.shape[2]
        return self.keys[..., : self.window, :], self.values[..., : self.window, :]


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # mx.fast.rms_norm accumulates in fp32 like the reference's upcast
        return mx.fast.rms_norm(x, self.weight, self.eps)


class MRoPE:
    """M-RoPE tables, computed once per forward and shared by all layers, over the whole head: a head's output is
    ``x * cos + x[..., perm] * sin``. ``perm`` swaps the halves of the first ``rotary_dim`` channels and
    ``sin`` carries rotate-half's sign; past ``rotary_dim`` cos is 1 and sin 0, so those channels pass as they
    are. Under ``mx.compile`` that is a gather and one fused elementwise kernel, where slices, a negation and
    concatenations each took their own; the arithmetic is the same, so the numbers are too."""

    def __init__(self, config: TextConfig):
        dim = config.rotary_dim
        base = config.rope_theta_value
        self.inv_freq = 1.0 / (base ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))  # (dim/2,)
        section = config.mrope_section
        if sum(section) != dim // 2:
            raise ValueError(f"mrope_section {section} must sum to rotary_dim/2 = {dim // 2}")
        # which of (t, h, w) each frequency reads: [0]*s0 + [1]*s1 + [2]*s2 (i % 3 for longer sections)
        axis = []
        for i, s in enumerate(section):
            axis += [i % 3] * s
        self.axis = mx.array(axis, dtype=mx.int32)
        h, n_pass = dim // 2, config.head_dim - dim
        self.perm = mx.array(list(range(h, dim)) + list(range(h)) + list(range(dim, config.head_dim)))
        self.sign = mx.array([-1.0] * h + [1.0] * h + [0.0] * n_pass)
        self.n_pass = n_pass

    def __call__(self, position_ids: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        # position_ids: (3, B, L) -> cos, sin: (B, 1, L, head_dim) in fp32, and perm
        pos = position_ids.astype(mx.float32).transpose(1, 2, 0)  # (B, L, 3)
        pos = mx.take(pos, self.axis, axis=-1)  # (B, L, dim/2)
        freqs = pos * self.inv_freq
        freqs = mx.concatenate([freqs, freqs, mx.zeros((*freqs.shape[:-1], self.n_pass))], axis=-1)[:, None]
        return mx.cos(freqs), mx.sin(freqs) * self.sign, self.perm


def apply_rotary(x: mx.array, rope: tuple[mx.array, mx.array, mx.array]) -> mx.array:
    cos, sin, perm = rope
    swapped = mx.take(x, perm, axis=-1)
    return (x.astype(mx.float32) * cos + swapped.astype(mx.float32) * sin).astype(x.dtype)


class GlmImageTextAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def __call__(self, x, rope, mask=None, cache: KVCache | None = None):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = apply_rotary(q, rope)
        k = apply_rotary(k, rope)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class GlmImageTextMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x):
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class GlmImageTextDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = GlmImageTextAttention(config)
        self.mlp = GlmImageTextMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)

    def __call__(self, x, rope, mask=None, cache=None):
        h = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))


def attention_mask_for(attention_mask: mx.array | None, L: int, offset=0, S: int | None = None):
    """The SDPA mask for L new queries at positions ``offset ..`` over S keys (a cache's window; without a cache,
    the L queries themselves).

    ``attention_mask`` (B, <= S) is 1 for real tokens and 0 for left padding, as in transformers; keys past it
    count as real (causality hides them). Padded queries keep their own key so that no row is fully masked (an
    all -inf row would turn into NaNs that then leak through 0 * NaN into later layers); real queries never see
    padded keys, so their outputs are unaffected.
    """
    if S is None:
        if attention_mask is None:
            return "causal" if L > 1 else None
        S = L
    q_pos = offset + mx.arange(L)[:, None]
    k_pos = mx.arange(S)[None, :]
    allowed = k_pos <= q_pos
    if attention_mask is None:
        return allowed
    valid = attention_mask[:, :S].astype(mx.bool_)
    if valid.shape[1] < S:
        valid = mx.pad(valid, [(0, 0), (0, S - valid.shape[1])], constant_values=True)
    return (allowed & valid[:, None, None, :]) | (k_pos == q_pos)  # (B, 1, L, S)


class GlmImageTextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [GlmImageTextDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MRoPE(config)

    def __call__(
        self,
        input_ids: mx.array,
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        cache: list[KVCache] | None = None,
    ) -> mx.array:
        h = self.embed_tokens(input_ids)
        B, L, _ = h.shape
        offset = cache[0].offset if cache is not None else 0
        if position_ids is None:
            position_ids = mx.broadcast_to((offset + mx.arange(L))[None, None], (3, B, L))
        elif position_ids.ndim == 2:
            position_ids = mx.broadcast_to(position_ids[None], (3, *position_ids.shape))
        rope = self.rotary_emb(position_ids)
        mask = attention_mask_for(attention_mask, L, offset, cache[0].window if cache is not None else None)
        if cache is None:
            cache = [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, rope, mask, c)
        return self.norm(h)
