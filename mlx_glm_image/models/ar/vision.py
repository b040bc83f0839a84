"""Vision encoder (ViT with interpolated position embeddings) and VQ quantizer of the AR prior model.

Used for image editing only: a source image's patches go through the ViT, the last hidden states are projected
by ``quant_conv`` and matched to the nearest (cosine) codebook entry; the code indices are the image's tokens.
Mirrors transformers' ``GlmImageVisionModel`` and ``GlmImageVQVAE.encode``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..activations import activation
from .config import VisionConfig, VQConfig


class Table(nn.Module):
    """A bare ``weight`` table read by index arithmetic (kept out of ``nn.quantize`` on purpose)."""

    def __init__(self, n: int, dims: int):
        super().__init__()
        self.weight = mx.zeros((n, dims))


def grid_sample_border(table: mx.array, gx: mx.array, gy: mx.array) -> mx.array:
    """``F.grid_sample(bilinear, align_corners=False, padding_mode='border')`` of one (H, W, C) table at N points.

    ``gx``, ``gy`` are normalised coordinates in [-1, 1]; returns (N, C) in fp32.
    """
    H, W, C = table.shape
    ix = mx.clip(((gx + 1) * W - 1) / 2, 0, W - 1)
    iy = mx.clip(((gy + 1) * H - 1) / 2, 0, H - 1)
    x0 = mx.floor(ix)
    y0 = mx.floor(iy)
    wx1, wy1 = ix - x0, iy - y0
    wx0, wy0 = 1 - wx1, 1 - wy1
    x0i = x0.astype(mx.int32)
    y0i = y0.astype(mx.int32)
    x1i = mx.minimum(x0i + 1, W - 1)
    y1i = mx.minimum(y0i + 1, H - 1)
    flat = table.reshape(H * W, C).astype(mx.float32)

    def at(yi, xi):
        return flat[yi * W + xi]

    return (
        at(y0i, x0i) * (wy0 * wx0)[:, None]
        + at(y0i, x1i) * (wy0 * wx1)[:, None]
        + at(y1i, x0i) * (wy1 * wx0)[:, None]
        + at(y1i, x1i) * (wy1 * wx1)[:, None]
    )


def vision_patch_coords(grid_thw, merge: int) -> list[np.ndarray]:
    """Per image (t*h*w, 2) (row, col) of each patch, block-major over merge x merge blocks (transformers order)."""
    out = []
    for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    return out


class GlmImageVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        n = (config.image_size // config.patch_size) ** 2
        self.position_embedding = Table(n, config.hidden_size)

    def __call__(self, x: mx.array, grid_thw, merge: int) -> mx.array:
        w = self.position_embedding.weight
        side = int(math.isqrt(w.shape[0]))
        table = w.reshape(side, side, -1)
        coords = np.concatenate(vision_patch_coords(grid_thw, merge), axis=0)
        sizes = np.concatenate([np.repeat([[h, w_]], t * h * w_, axis=0) for t, h, w_ in np.asarray(grid_thw).reshape(-1, 3)])
        hc = mx.array(coords[:, 0].astype(np.float32))
        wc = mx.array(coords[:, 1].astype(np.float32))
        th = mx.array(sizes[:, 0].astype(np.float32))
        tw = mx.array(sizes[:, 1].astype(np.float32))
        gx = ((wc + 0.5) / tw) * 2 - 1
        gy = ((hc + 0.5) / th) * 2 - 1
        pos = grid_sample_border(table, gx, gy).astype(w.dtype)
        return x + pos


class GlmImageVisionPatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.in_channels = config.in_channels
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        p, c = self.patch_size, self.in_channels
        # rows are (C, p, p) patches, as the processor flattens them; MLX convs are channels-last
        x = pixel_values.reshape(-1, c, p, p).transpose(0, 2, 3, 1).astype(self.proj.weight.dtype)
        return self.proj(x).reshape(x.shape[0], -1)


class GlmImageVisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def __call__(self, x: mx.array) -> mx.array:
        # x: (N, C) tokens of one image; attention is bidirectional within the image
        N = x.shape[0]
        qkv = self.qkv(x).reshape(N, 3, self.num_heads, self.head_dim).transpose(1, 2, 0, 3)
        q, k, v = qkv[0][None], qkv[1][None], qkv[2][None]
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.proj(o[0].transpose(1, 0, 2).reshape(N, -1))


class GlmImageVisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GlmImageVisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = GlmImageVisionAttention(config)
        self.mlp = GlmImageVisionMLP(config)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GlmImageVisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.embeddings = GlmImageVisionEmbeddings(config)
        self.patch_embed = GlmImageVisionPatchEmbed(config)
        self.blocks = [GlmImageVisionBlock(config) for _ in range(config.depth)]

    def __call__(self, pixel_values: mx.array, grid_thw) -> mx.array:
        """Packed patches (total, C*p*p) of the images in ``grid_thw`` -> last hidden states (total, hidden)."""
        grid_thw = np.asarray(grid_thw).reshape(-1, 3)
        h = self.patch_embed(pixel_values)
        h = self.embeddings(h, grid_thw, self.spatial_merge_size)
        lengths = [int(t * hh * ww) for t, hh, ww in grid_thw]
        bounds = np.cumsum([0] + lengths)
        outs = []
        for i in range(len(lengths)):
            x = h[int(bounds[i]) : int(bounds[i + 1])]
            for blk in self.blocks:
                x = blk(x)
            outs.append(x)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)


class GlmImageVQVAEVectorQuantizer(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.embedding = Table(config.num_embeddings, config.embed_dim)

    def __call__(self, z: mx.array) -> mx.array:
        """(N, D) features -> (N,) indices of the nearest L2-normalised codebook vector."""
        z = z.astype(mx.float32)
        z = z / mx.maximum(mx.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
        e = self.embedding.weight.astype(mx.float32)
        e = e / mx.maximum(mx.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        # the reference's expanded squared distance, term for term, so that near-ties break the same way
        d = mx.sum(z * z, axis=1, keepdims=True) + mx.sum(e * e, axis=1) - 2 * (z @ e.T)
        return mx.argmin(d, axis=1)


class GlmImageVQVAE(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.quantize = GlmImageVQVAEVectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)  # decoding only; kept for loading

    def encode(self, hidden_states: mx.array) -> mx.array:
        """(N, latent_channels) features of one image (row-major grid) -> (N,) token ids."""
        z = self.quant_conv(hidden_states[None, None])[0, 0]  # a 1x1 conv is a per-token linear map
        return self.quantize(z)
