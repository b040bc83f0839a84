"""The VAE's memory policy, the pipeline's choice: evaluate piece by piece, and tile large images.

``decode``/``encode`` hand ``mx.eval`` to the model (slab convolutions, chunked attention, one decoder block at
a time) and, when asked or when the image is large, run diffusers' tiled decode / tiled encode, one tile
evaluated at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..models.vae import AutoencoderKL


@dataclass
class VaeTiling:
    """Tiles of ``tile_sample_size`` pixels overlapping by ``overlap``; automatic above ``auto_pixels`` pixels,
    so the pipeline's usual sizes decode untiled (= diffusers, which does not enable tiling)."""

    tile_sample_size: int = 512
    overlap: float = 0.25
    auto_pixels: int = 1024 * 1024

    def use(self, tiled: bool | None, height_px: int, width_px: int) -> bool:
        if tiled is None:
            return height_px * width_px > self.auto_pixels and max(height_px, width_px) > self.tile_sample_size
        return bool(tiled)


def decode(vae: AutoencoderKL, z: mx.array, tiled: bool | None = None, tiling: VaeTiling = VaeTiling()) -> mx.array:
    """(B, C, h, w) denormalized latents -> (B, 3, 8h, 8w) image, evaluated, with bounded memory."""
    vae._check(z, vae.config.latent_channels, "latents")
    f = vae.scale_factor
    if not tiling.use(tiled, z.shape[2] * f, z.shape[3] * f):
        out = vae.decode(z, evaluate=mx.eval)
    else:
        size = tiling.tile_sample_size
        zt = z.transpose(0, 2, 3, 1).astype(vae.dtype)
        out = _tiled(zt, lambda t: vae.decode_nhwc(t, mx.eval), size // f, size, tiling.overlap).transpose(0, 3, 1, 2)
    mx.eval(out)
    return out


def encode(vae: AutoencoderKL, x: mx.array, tiled: bool | None = None, tiling: VaeTiling = VaeTiling()) -> mx.array:
    """(B, 3, H, W) image in [-1, 1] -> (B, C, H/8, W/8) posterior mean, evaluated, with bounded memory."""
    vae._check(x, vae.config.in_channels, "image", multiple=vae.scale_factor)
    if not tiling.use(tiled, x.shape[2], x.shape[3]):
        out = vae.encode(x, evaluate=mx.eval)
    else:
        size = tiling.tile_sample_size
        xt = x.transpose(0, 2, 3, 1).astype(vae.dtype)
        moments = _tiled(xt, lambda t: vae.encode_nhwc(t, mx.eval), size, size // vae.scale_factor, tiling.overlap)
        out = moments[..., : vae.config.latent_channels].transpose(0, 3, 1, 2)
    mx.eval(out)
    return out


def _blend_v(a: mx.array, b: mx.array, extent: int) -> mx.array:
    """diffusers' blend_v in NHWC: the first rows of b fade in from the last rows of a."""
    extent = min(a.shape[1], b.shape[1], extent)
    if extent <= 0:
        return b
    w = (mx.arange(extent, dtype=mx.float32) / extent).reshape(1, extent, 1, 1)
    top = a[:, -extent:].astype(mx.float32) * (1 - w) + b[:, :extent].astype(mx.float32) * w
    return mx.concatenate([top.astype(b.dtype), b[:, extent:]], axis=1)


def _blend_h(a: mx.array, b: mx.array, extent: int) -> mx.array:
    extent = min(a.shape[2], b.shape[2], extent)
    if extent <= 0:
        return b
    w = (mx.arange(extent, dtype=mx.float32) / extent).reshape(1, 1, extent, 1)
    left = a[:, :, -extent:].astype(mx.float32) * (1 - w) + b[:, :, :extent].astype(mx.float32) * w
    return mx.concatenate([left.astype(b.dtype), b[:, :, extent:]], axis=2)


def _tiled(x: mx.array, fn, tile_in: int, tile_out: int, overlap_factor: float) -> mx.array:
    """diffusers' tiled_decode / _tiled_encode in NHWC, one tile evaluated at a time.

    ``fn`` maps a (B, tile_in, tile_in, C) tile to (B, tile_out, tile_out, C'); tiles start every
    ``tile_in * (1 - overlap)`` input pixels, overlaps are blended linearly over ``tile_out * overlap`` output
    pixels, and each tile keeps its first ``tile_out - blend`` rows/columns. Blending uses the already-blended
    neighbours (diffusers blends in place), so only the previous row of tiles is kept.
    """
    stride = int(tile_in * (1 - overlap_factor))
    blend = int(tile_out * overlap_factor)
    limit = tile_out - blend
    if stride < 1 or limit < 1:
        raise ValueError(f"tile size {tile_in} with overlap {overlap_factor} leaves no stride")
    H, W = x.shape[1], x.shape[2]
    prev_row: list[mx.array] = []
    out_rows = []
    for i in range(0, H, stride):
        row: list[mx.array] = []
        cropped = []
        for jj, j in enumerate(range(0, W, stride)):
            tile = fn(x[:, i : i + tile_in, j : j + tile_in])
            if prev_row:
                tile = _blend_v(prev_row[jj], tile, blend)
            if row:
                tile = _blend_h(row[-1], tile, blend)
            mx.eval(tile)
            row.append(tile)
            cropped.append(tile[:, :limit, :limit])
        out_rows.append(mx.concatenate(cropped, axis=2))
        mx.eval(out_rows[-1])
        prev_row = row
    return mx.concatenate(out_rows, axis=1)
