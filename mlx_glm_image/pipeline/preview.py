"""Live previews of the denoising: at a few steps, the clean image the latents point at, decoded small.

The clean latents a step's velocity points at are its sampler's ``x0`` (flow.py). They are average-pooled by a
power of 2 (to at most ``SIDE`` pixels a side) and decoded by the VAE: a decode's work grows with its pixels, so
a 4x pooled preview of a 1024x1024 image costs 1/16 of the final decode (benchmarks/README.md has the measured
cost). Previews only read the loop's arrays: the final image is the same with or without them.
"""

from __future__ import annotations

import mlx.core as mx

SIDE = 256  # the largest preview side, in pixels


def preview_steps(steps: int, count: int) -> list[int]:
    """The steps after which ``count`` previews come, spread over the run and never after the last step (whose
    image is the result): step ``round((j + 1) * steps / (count + 1)) - 1`` for preview j."""
    picked = sorted({min(max(round((j + 1) * steps / (count + 1)) - 1, 0), steps - 2) for j in range(count)})
    return [s for s in picked if 0 <= s < steps - 1]


def pooling(height: int, width: int, latent_height: int, latent_width: int) -> int:
    """The power of 2 the latents are pooled by: the preview's larger side at most ``SIDE``, the latent grid whole."""
    factor = 1
    while max(height, width) // factor > SIDE and latent_height % (2 * factor) == 0 and latent_width % (2 * factor) == 0:
        factor *= 2
    return factor


def pooled(latents: mx.array, factor: int) -> mx.array:
    """(B, C, h, w) -> (B, C, h / factor, w / factor) by averaging."""
    if factor == 1:
        return latents
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))
