"""GLM-Image's diffusion transformer (diffusers' ``GlmImageTransformer2DModel``) in MLX.

Parameter names equal diffusers', so a diffusers ``transformer/`` folder loads without key mapping.
Inside, tokens are (B, S, D) and attention runs on (B, H, S, Dh); the public call takes and returns NCHW
latents like diffusers. Text (glyph) tokens come first in the joint sequence and get no rotary embedding.

The forward is three public, pure pieces: ``embed`` (the joint token sequence and what every block reads),
``block(i, ...)`` (one transformer block, callable on its own) and ``head`` (back to NCHW latents); ``__call__`` is
their composition. Nothing evaluates: without a ``step_hook`` a forward is one lazy graph (and runs under
``mx.compile``); the denoising loop passes a hook that decides when each step is evaluated, and may run the
blocks itself (a step cache skips some).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .activations import activation
from .base import PretrainedModel, config_from_dict

CACHE_MODES = ("write", "read", "skip")


@dataclass
class GlmImageTransformerConfig:
    # Defaults: diffusers' (what it reads when a key is absent), as every config class here; the released values
    # (32 heads of 128) are in released.py.
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 40
    num_attention_heads: int = 64
    text_embed_dim: int = 1472
    time_embed_dim: int = 512
    condition_dim: int = 256
    prior_vq_quantizer_codebook_size: int = 16384

    @classmethod
    def from_dict(cls, config: dict) -> "GlmImageTransformerConfig":
        return config_from_dict(cls, config)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The image tokens' grid (rows, columns) of (height, width) latents: one token per patch. An image of H x
        W pixels has latents of H / vae_scale_factor x W / vae_scale_factor."""
        return height // self.patch_size, width // self.patch_size


# ---------------------------------------------------------------------------------------------------------
# Fused elementwise pieces. Matmuls dominate the FLOPs; these are where compile saves memory traffic. They are
# traced per shape (once per image size), not shapeless: shape-specialised kernels measured faster on an H200
# (benchmarks/README.md), and a shapeless trace mis-shapes zero-size inputs.


@mx.compile
def _modulate(x, shift, scale):
    # LayerNorm without affine (eps 1e-5, fp32 accumulation inside mx.fast.layer_norm), then AdaLN.
    return mx.fast.layer_norm(x, None, None, 1e-5) * (1 + scale) + shift


# The blocks keep text and image tokens in one (B, L + N, D) sequence, so that no block concatenates or
# slices activations; these pick each token's text ("c_") or image chunk inside the fused kernel.


@mx.compile
def _modulate_joint(x, is_text, shift, c_shift, scale, c_scale):
    return _modulate(x, mx.where(is_text, c_shift, shift), mx.where(is_text, c_scale, scale))


@mx.compile
def _gated_add_joint(x, y, is_text, gate, c_gate):
    return x + y * mx.where(is_text, c_gate, gate)


@mx.compile
def _qk_norm_rope(x, cos, sin):
    """Affine-free LayerNorm over each head, then rotate-half RoPE in fp32.

    x: (B, S, H, Dh); cos/sin: (S, 1, 2, Dh/2), sin already signed for rotate-half ([-sin, sin]). Viewing the
    head as its two halves, rotate-half is a reversed view of that axis: no concatenation, and the fused
    kernel writes only the bf16 result.
    """
    b, s, h, d = x.shape
    dtype = x.dtype
    x = mx.fast.layer_norm(x, None, None, 1e-5).reshape(b, s, h, 2, d // 2).astype(mx.float32)
    return (x * cos + x[..., ::-1, :] * sin).astype(dtype).reshape(b, s, h, d)


def timestep_embedding(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """diffusers' get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin], fp32."""
    half = dim // 2
    # float64 then one rounding: the frequencies are exact to fp32, whatever exp the backend has
    freqs = mx.array(np.exp(-math.log(max_period) * np.arange(half) / half).astype(np.float32))
    args = t.astype(mx.float32)[:, None] * freqs[None]
    emb = mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


def rope_2d(height: int, width: int, head_dim: int, theta: float = 10000.0) -> tuple[mx.array, mx.array]:
    """GlmImageRotaryPosEmbed: (cos, sin) of shape (height*width, head_dim) for a token grid, fp32.

    The first quarter of the head's frequencies follow the row, the second the column, and the half is
    repeated so that rotate-half pairs dimension i with i + head_dim/2.
    """
    quarter = head_dim // 4
    dim_half = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, dim_half, 2, dtype=mx.float32)[:quarter] / dim_half))
    freqs_h = mx.arange(height, dtype=mx.float32)[:, None] * inv_freq[None]  # (h, dim/4)
    freqs_w = mx.arange(width, dtype=mx.float32)[:, None] * inv_freq[None]  # (w, dim/4)
    freqs = mx.concatenate(
        [
            mx.broadcast_to(freqs_h[:, None, :], (height, width, quarter)),
            mx.broadcast_to(freqs_w[None, :, :], (height, width, quarter)),
        ],
        axis=-1,
    )
    freqs = mx.concatenate([freqs, freqs], axis=-1).reshape(height * width, -1)
    return mx.cos(freqs), mx.sin(freqs)


# ---------------------------------------------------------------------------------------------------------
# Layers, named as diffusers names them.


class GELU(nn.Module):
    """diffusers' GELU / LinearActivation: a projection followed by its activation."""

    def __init__(self, dim_in: int, dim_out: int, activation_name: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.activation = activation(activation_name)

    def __call__(self, x):
        return self.activation(self.proj(x))


class FeedForward(nn.Module):
    """diffusers' FeedForward: net = [activation projection, dropout (identity here), output linear]."""

    def __init__(self, dim: int, dim_out: int, inner_dim: int | None = None, activation_fn: str = "gelu"):
        super().__init__()
        inner_dim = inner_dim or 4 * dim
        self.net = [GELU(dim, inner_dim, activation_fn), nn.Identity(), nn.Linear(inner_dim, dim_out)]

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TwoLayerMLP(nn.Module):
    """TimestepEmbedding / PixArtAlphaTextProjection(act_fn="silu"): linear_1, SiLU, linear_2."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x):
        return self.linear_2(nn.silu(self.linear_1(x)))


class GlmImageCombinedTimestepSizeEmbeddings(nn.Module):
    def __init__(self, embedding_dim: int, condition_dim: int, timesteps_dim: int):
        super().__init__()
        self.condition_dim = condition_dim
        self.timesteps_dim = timesteps_dim
        self.timestep_embedder = TwoLayerMLP(timesteps_dim, embedding_dim)
        self.condition_embedder = TwoLayerMLP(4 * condition_dim, embedding_dim)

    def __call__(self, timestep, target_size, crop_coords, dtype):
        batch = target_size.shape[0]
        t_proj = timestep_embedding(timestep, self.timesteps_dim)
        crop_proj = timestep_embedding(crop_coords.reshape(-1), self.condition_dim).reshape(batch, -1)
        size_proj = timestep_embedding(target_size.reshape(-1), self.condition_dim).reshape(batch, -1)
        cond = mx.concatenate([crop_proj, size_proj], axis=1)
        emb = self.timestep_embedder(t_proj.astype(dtype)) + self.condition_embedder(cond.astype(dtype))
        return nn.silu(emb)  # (B, time_embed_dim)


class GlmImageImageProjector(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size**2, hidden_size)

    def __call__(self, x):
        # (B, C, H, W) -> (B, H/p * W/p, C*p*p), channel-major inside a patch as diffusers flattens it
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)
        return self.proj(x)


class GlmImageAdaLayerNormZero(nn.Module):
    """The 12-way modulation of one block: (shift, scale, gate) for attention and MLP, image and text."""

    def __init__(self, embedding_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(embedding_dim, 12 * dim)

    def __call__(self, temb):
        # diffusers' chunk order: image and text ("c_") alternate within each of the six kinds
        emb = self.linear(temb)[:, None, :]  # (B, 1, 12*D)
        return mx.split(emb, 12, axis=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = [nn.Linear(inner, dim)]

    def __call__(self, x, cos, sin, mask=None, kv_cache: "GlmImageLayerKVCache | None" = None,
                 kv_cache_mode: str | None = None):
        """x: (B, S, D) text then image tokens; cos/sin: (S, 1, 2, Dh/2) as _qk_norm_rope takes them, with
        identity rows for the text. ``kv_cache_mode`` ("write", "read", "skip") overrides the cache's own mode."""
        b, s, _ = x.shape
        q = _qk_norm_rope(self.to_q(x).reshape(b, s, self.heads, -1), cos, sin)
        k = _qk_norm_rope(self.to_k(x).reshape(b, s, self.heads, -1), cos, sin)
        v = self.to_v(x).reshape(b, s, self.heads, -1)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, S, Dh)

        mode = kv_cache_mode or (kv_cache.mode if kv_cache is not None else None)
        if kv_cache is not None:
            if mode == "write":
                kv_cache.store(k, v)
            elif mode == "read":
                k, v = kv_cache.get(k, v)
                if mask is not None:  # cached condition keys count as real tokens
                    extra = mx.broadcast_to(mask[..., -1:], (*mask.shape[:-1], k.shape[2] - s))
                    mask = mx.concatenate([extra, mask], axis=-1)

        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(b, s, -1)
        return self.to_out[0](out)


class GlmImageTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, time_embed_dim: int):
        super().__init__()
        self.norm1 = GlmImageAdaLayerNormZero(time_embed_dim, dim)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim)
        self.ff = FeedForward(dim, dim, activation_fn="gelu-approximate")

    def steps(self, is_text, temb, cos, sin, mask=None, kv_cache=None, kv_cache_mode=None):
        """The block as its two residual steps, attention then feed-forward, each a function of x: the model
        evaluates them one at a time to bound memory.

        x: (B, L + N, D) text then image tokens; is_text: (L + N, 1) bool. Both streams share the QKV and
        feed-forward weights, so one joint sequence runs through one matmul each.
        """
        (
            shift_msa, c_shift_msa, scale_msa, c_scale_msa, gate_msa, c_gate_msa,
            shift_mlp, c_shift_mlp, scale_mlp, c_scale_mlp, gate_mlp, c_gate_mlp,
        ) = self.norm1(temb)  # fmt: skip

        def attention(x):
            attn = self.attn1(_modulate_joint(x, is_text, shift_msa, c_shift_msa, scale_msa, c_scale_msa), cos, sin, mask,
                              kv_cache, kv_cache_mode)
            return _gated_add_joint(x, attn, is_text, gate_msa, c_gate_msa)

        def feed_forward(x):
            ff = self.ff(_modulate_joint(x, is_text, shift_mlp, c_shift_mlp, scale_mlp, c_scale_mlp))
            return _gated_add_joint(x, ff, is_text, gate_mlp, c_gate_mlp)

        return attention, feed_forward


class GlmImageAdaLayerNormContinuous(nn.Module):
    """Final AdaLN: no activation before the linear (the conditioning is already SiLU'd); scale comes first."""

    def __init__(self, embedding_dim: int, conditioning_dim: int):
        super().__init__()
        self.linear = nn.Linear(conditioning_dim, 2 * embedding_dim)

    def __call__(self, x, temb):
        scale, shift = mx.split(self.linear(temb.astype(x.dtype))[:, None, :], 2, axis=-1)
        return _modulate(x, shift, scale)


# ---------------------------------------------------------------------------------------------------------
# KV cache for condition images (image editing), with diffusers' semantics.


class GlmImageLayerKVCache:
    """One layer's cached keys/values, one entry per batch sample, each (1, H, S_cond, Dh).

    Stored arrays stay lazy: the condition pass is computed by the first step that reads it, once; later
    steps reuse the evaluated arrays.
    """

    def __init__(self):
        self.k_caches: list[mx.array] = []
        self.v_caches: list[mx.array] = []
        self.mode: str | None = None
        self.current_sample_idx = 0

    def store(self, k: mx.array, v: mx.array):
        if len(self.k_caches) <= self.current_sample_idx:
            self.k_caches.append(k)
            self.v_caches.append(v)
        else:  # another condition image of the same sample
            i = self.current_sample_idx
            self.k_caches[i] = mx.concatenate([self.k_caches[i], k], axis=2)
            self.v_caches[i] = mx.concatenate([self.v_caches[i], v], axis=2)

    def get(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Cached keys/values of every sample, prepended along the sequence to the current ones."""
        batch = k.shape[0]
        n = len(self.k_caches)
        if n == 0:
            return k, v
        if n != 1 and batch % n:
            raise ValueError(
                f"Cannot match {n} cached samples to batch size {batch}. "
                "Batch size must be a multiple of the number of cached samples."
            )
        lengths = {c.shape[2] for c in self.k_caches}
        if len(lengths) > 1:
            raise ValueError(f"cached samples have different condition lengths {sorted(lengths)}; they cannot be batched")
        repeat = batch // n
        k_cache, v_cache = (
            mx.concatenate(
                [mx.broadcast_to(c, (repeat, *c.shape[1:])) for c in caches], axis=0
            ) if n > 1 else mx.broadcast_to(caches[0], (batch, *caches[0].shape[1:]))
            for caches in (self.k_caches, self.v_caches)
        )
        return mx.concatenate([k_cache.astype(k.dtype), k], axis=2), mx.concatenate([v_cache.astype(v.dtype), v], axis=2)

    def clear(self):
        self.k_caches = []
        self.v_caches = []
        self.mode = None
        self.current_sample_idx = 0

    def next_sample(self):
        self.current_sample_idx += 1


class GlmImageKVCache:
    """All layers' caches. The mode is "write" for the condition pass, "read" for the conditional denoising
    pass, "skip" for the unconditional one: given per call (the forward's ``kv_cache_mode``, as the pipeline
    does), or set on the cache with diffusers' ``set_mode``. next_sample() after each sample's condition images."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.caches = [GlmImageLayerKVCache() for _ in range(num_layers)]

    def __getitem__(self, layer_idx: int) -> GlmImageLayerKVCache:
        return self.caches[layer_idx]

    def set_mode(self, mode: str | None):
        if mode is not None and mode not in CACHE_MODES:
            raise ValueError(f"Invalid mode: {mode}, must be one of 'write', 'read', 'skip'")
        for cache in self.caches:
            cache.mode = mode

    def next_sample(self):
        for cache in self.caches:
            cache.next_sample()

    def clear(self):
        for cache in self.caches:
            cache.clear()


# ---------------------------------------------------------------------------------------------------------


def _as_array(x, dtype=None) -> mx.array:
    x = x if isinstance(x, mx.array) else mx.array(x)
    return x.astype(dtype) if dtype is not None else x


class GlmImageTransformer2DModel(PretrainedModel):
    component = "transformer"
    config_class = GlmImageTransformerConfig
    quantize_by_default = True
    full_precision_note = "timestep/size conditioning, the patch in/out projections and the prior-token table"
    # Their error would reach every token of every step.
    FULL_PRECISION = ("time_condition_embed", "image_projector", "norm_out", "proj_out", "prior_token_embedding")

    def __init__(self, config: GlmImageTransformerConfig | dict | None = None):
        super().__init__()
        self.config = c = self.as_config(config)
        dim = c.inner_dim
        self.image_projector = GlmImageImageProjector(c.in_channels, dim, c.patch_size)
        self.glyph_projector = FeedForward(c.text_embed_dim, dim, inner_dim=dim, activation_fn="gelu")
        self.prior_token_embedding = nn.Embedding(c.prior_vq_quantizer_codebook_size, dim)
        self.prior_projector = FeedForward(dim, dim, inner_dim=dim, activation_fn="linear-silu")
        self.time_condition_embed = GlmImageCombinedTimestepSizeEmbeddings(c.time_embed_dim, c.condition_dim, c.time_embed_dim)
        self.transformer_blocks = [
            GlmImageTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim, c.time_embed_dim)
            for _ in range(c.num_layers)
        ]
        self.norm_out = GlmImageAdaLayerNormContinuous(dim, c.time_embed_dim)
        self.proj_out = nn.Linear(dim, c.patch_size**2 * c.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        return self.proj_out.bias.dtype

    def quant_predicate(self, path: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and not path.startswith(self.FULL_PRECISION)

    @staticmethod
    def tensor_plan(config: GlmImageTransformerConfig, n: int, rank: int) -> list:
        """cache-dit's plan for GLM-Image's DiT, in every block: q/k/v and the feed-forward's first projection
        split by output (whole heads per rank), the attention output and the feed-forward's second projection by
        input (one all-reduce each), and the AdaLN modulation by input (its input, the time embedding, is whole on
        every rank: each takes its part; one small all-reduce). Everything outside the blocks stays whole."""
        from ..sharding import Share, part, require

        ff = 4 * config.inner_dim  # FeedForward's default inner width
        require({"attention heads": config.num_attention_heads, "time embedding width": config.time_embed_dim}, n,
                "the DiT")
        heads, inner, time = (part(w, n, rank) for w in (config.inner_dim, ff, config.time_embed_dim))
        plan = []
        for i in range(config.num_layers):
            b = f"transformer_blocks.{i}"
            plan += [Share(f"{b}.attn1.{name}", "out", (heads,)) for name in ("to_q", "to_k", "to_v")]
            plan += [Share(f"{b}.attn1.to_out.0", "in", (heads,)), Share(f"{b}.ff.net.0.proj", "out", (inner,)),
                     Share(f"{b}.ff.net.2", "in", (inner,)), Share(f"{b}.norm1.linear", "in", (time,), slice_input=True)]
        return plan

    def shard_heads(self, n: int):
        for block in self.transformer_blocks:
            block.attn1.heads //= n

    # -- forward -------------------------------------------------------------------------------------------

    def _check_inputs(self, hidden_states, encoder_hidden_states, prior_token_id):
        c = self.config
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states must be (batch, {c.in_channels}, height, width), got shape {tuple(hidden_states.shape)}")
        b, ch, h, w = hidden_states.shape
        if ch != c.in_channels:
            raise ValueError(f"hidden_states has {ch} channels, the model expects {c.in_channels}")
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {c.patch_size}")
        rows, cols = c.token_grid(h, w)
        if prior_token_id.shape[-1] not in (1, rows * cols):  # one id is broadcast over the grid, as in diffusers
            raise ValueError(
                f"prior_token_id has {prior_token_id.shape[-1]} tokens, a {h}x{w} latent needs "
                f"{rows}x{cols} = {rows * cols}"
            )
        if prior_token_id.ndim == 2 and prior_token_id.shape[0] not in (1, b):
            raise ValueError(f"prior_token_id has batch {prior_token_id.shape[0]}, hidden_states has {b}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != c.text_embed_dim:
            raise ValueError(
                f"encoder_hidden_states must be (batch, text_len, {c.text_embed_dim}), got shape {tuple(encoder_hidden_states.shape)}"
            )
        if encoder_hidden_states.shape[0] not in (1, b):
            raise ValueError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}, hidden_states has {b}")

    def __call__(
        self,
        hidden_states,
        encoder_hidden_states,
        prior_token_id,
        prior_token_drop,
        timestep,
        target_size,
        crop_coords,
        attention_mask=None,
        kv_caches: GlmImageKVCache | None = None,
        return_dict: bool = True,
        step_hook: Callable[[mx.array], mx.array] | None = None,
        kv_cache_mode: str | None = None,
    ):
        """Velocity for latents ``hidden_states`` (B, C, H, W): (B, C, H, W) in the model's dtype, as
        ``Transformer2DModelOutput(sample=...)`` or, with ``return_dict=False``, the tuple ``(sample,)``.

        encoder_hidden_states: (B, L, text_embed_dim) glyph embeddings (L may be 0); prior_token_id: (B, N), (N,)
        or (1,) ids on the token grid; prior_token_drop: bool, same shape (True zeroes that prior embedding
        before the projector) or per sample; timestep: (B,) or scalar; target_size, crop_coords: (B, 2);
        attention_mask: (B, L) with 1 for real text tokens. ``kv_cache_mode`` ("write", "read", "skip") is the
        mode of ``kv_caches`` for this call (default: the cache's own, diffusers' ``set_mode``). ``step_hook(x) ->
        x`` is called on the joint token sequence after each of a block's two steps (attention, feed-forward): the
        caller's place to evaluate. The forward itself evaluates nothing: it is ``head(block(... block(embed(...))))``.
        """
        if kv_cache_mode is not None and kv_cache_mode not in CACHE_MODES:
            raise ValueError(f"Invalid mode: {kv_cache_mode}, must be one of 'write', 'read', 'skip'")
        x, context = self.embed(hidden_states, encoder_hidden_states, prior_token_id, prior_token_drop, timestep,
                                target_size, crop_coords, attention_mask)
        for i in range(len(self.transformer_blocks)):
            x = self.block(i, x, context, kv_caches[i] if kv_caches is not None else None, kv_cache_mode, step_hook)
        sample = self.head(x, context)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def embed(self, hidden_states, encoder_hidden_states, prior_token_id, prior_token_drop, timestep, target_size,
              crop_coords, attention_mask=None) -> tuple[mx.array, "DitContext"]:
        """The joint token sequence (B, L + N, D), text then image tokens, and what every block and the head read.
        Takes ``__call__``'s inputs."""
        dtype = self.dtype
        hidden_states = _as_array(hidden_states, dtype)
        encoder_hidden_states = _as_array(encoder_hidden_states, dtype)
        prior_token_id = _as_array(prior_token_id).astype(mx.int32)
        self._check_inputs(hidden_states, encoder_hidden_states, prior_token_id)
        c = self.config
        b, _, h, w = hidden_states.shape

        timestep = mx.broadcast_to(_as_array(timestep, mx.float32).reshape(-1), (b,))
        target_size = mx.broadcast_to(_as_array(target_size, mx.float32).reshape(-1, 2), (b, 2))
        crop_coords = mx.broadcast_to(_as_array(crop_coords, mx.float32).reshape(-1, 2), (b, 2))

        x = self.image_projector(hidden_states)  # (B, N, D)
        text = self.glyph_projector(encoder_hidden_states)  # (B, L, D)
        if text.shape[0] != b:
            text = mx.broadcast_to(text, (b, *text.shape[1:]))
        prior = self.prior_token_embedding(prior_token_id)  # (B, N, D), (N, D) or (1, D)
        drop = _as_array(prior_token_drop).astype(mx.bool_)
        drop = drop.reshape(*drop.shape, *([1] * (prior.ndim - drop.ndim)))
        prior = mx.where(drop, mx.zeros_like(prior), prior)
        x = x + self.prior_projector(prior)

        temb = self.time_condition_embed(timestep, target_size, crop_coords, dtype)
        text_len = text.shape[1]
        grid = c.token_grid(h, w)
        cos, sin = self._rope(text_len, *grid)
        is_text = (mx.arange(text_len + x.shape[1]) < text_len)[:, None]
        mask = None
        if attention_mask is not None:
            attention_mask = _as_array(attention_mask)
            if attention_mask.shape != (b, text_len):
                raise ValueError(f"attention_mask must be (batch, text_len) = {(b, text_len)}, got {tuple(attention_mask.shape)}")
            # diffusers casts its boolean pair mask to the query dtype before SDPA, so it ADDS 1 to the
            # scores of pairs of real tokens instead of hiding padding. Matched as is (docs/checkpoint.md).
            valid = mx.concatenate([(attention_mask > 0).astype(dtype), mx.ones((b, x.shape[1]), dtype)], axis=1)
            mask = valid[:, None, :, None] * valid[:, None, None, :]  # (B, 1, S, S)
        context = DitContext(text_len=text_len, temb=temb, cos=cos, sin=sin, is_text=is_text, mask=mask, grid=grid)
        return mx.concatenate([text, x], axis=1), context

    def block(self, index: int, x: mx.array, context: "DitContext", kv_cache: "GlmImageLayerKVCache | None" = None,
              kv_cache_mode: str | None = None, step_hook: Callable[[mx.array], mx.array] | None = None) -> mx.array:
        """Transformer block ``index`` on the joint sequence ``x``; ``step_hook`` sees x after its attention and
        after its feed-forward step."""
        c = context
        for step in self.transformer_blocks[index].steps(c.is_text, c.temb, c.cos, c.sin, c.mask, kv_cache, kv_cache_mode):
            x = step(x)
            if step_hook is not None:
                x = step_hook(x)
        return x

    def head(self, x: mx.array, context: "DitContext") -> mx.array:
        """The image tokens of the joint sequence -> (B, out_channels, H, W) latents, as diffusers unpatchifies."""
        x = self.proj_out(self.norm_out(x[:, context.text_len:], context.temb))  # (B, N, p*p*C_out)
        b = x.shape[0]
        p = self.config.patch_size
        gh, gw = context.grid
        return x.reshape(b, gh, gw, -1, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(b, -1, gh * p, gw * p)

    def _rope(self, text_len: int, gh: int, gw: int):
        """cos/sin for the joint sequence as _qk_norm_rope takes them: text tokens get the identity rotation
        (cos 1, sin 0), so one table covers it; sin is signed for rotate-half."""
        head_dim = self.config.attention_head_dim
        cos, sin = rope_2d(gh, gw, head_dim)
        half = head_dim // 2
        cos = mx.concatenate([mx.ones((text_len, cos.shape[1])), cos]).reshape(-1, 1, 2, half)
        sin = mx.concatenate([mx.zeros((text_len, sin.shape[1])), sin]).reshape(-1, 1, 2, half)
        return cos, sin * mx.array([-1.0, 1.0])[:, None]  # rotate-half: the first half takes -x2 * sin


@dataclass(frozen=True)
class DitContext:
    """What every block and the head of one forward read besides the token sequence (made by ``embed``)."""

    text_len: int  # glyph tokens at the front of the joint sequence
    temb: mx.array  # (B, time_embed_dim) timestep and size conditioning
    cos: mx.array  # rotary tables of the joint sequence, identity for the text
    sin: mx.array
    is_text: mx.array  # (L + N, 1) bool
    mask: mx.array | None  # (B, 1, S, S), only with an attention_mask
    grid: tuple[int, int]  # the image's token grid (latent height / patch, latent width / patch)


@dataclass
class Transformer2DModelOutput:
    """diffusers' Transformer2DModelOutput."""

    sample: mx.array
