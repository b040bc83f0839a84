"""diffusers' AutoencoderKL (encoder, decoder) in MLX.

NHWC inside (MLX's convolution layout); ``encode``/``decode`` take and return NCHW like diffusers.
Parameter names are diffusers' so a ``vae/`` folder loads after ``sanitize`` transposes the conv kernels.

Nothing here evaluates on its own. Given an ``evaluate`` function (the caller's memory policy: the pipeline
passes ``mx.eval``), large convolutions run in row slabs, the mid-block attention in query chunks, and each
piece and each decoder block is handed to ``evaluate`` before the next is built; without one, the whole
encode or decode is one lazy graph. Tiling is the pipeline's (``pipeline/decode.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .activations import ACTIVATIONS, activation
from .base import PretrainedModel, config_from_dict

Evaluate = Callable[[mx.array], None] | None


@dataclass
class AutoencoderKLConfig:
    # Defaults: diffusers' (what it reads when a key is absent), as every config class here; the released values
    # (four blocks, no mid-block attention, no quant convs) are in released.py.
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | list = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: list | None = None
    latents_std: list | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    quantization: dict | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderKLConfig":
        return config_from_dict(cls, d)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                raise ValueError(f"unsupported down block {t!r} (only DownEncoderBlock2D)")
        for t in self.up_block_types:
            if t != "UpDecoderBlock2D":
                raise ValueError(f"unsupported up block {t!r} (only UpDecoderBlock2D)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"unsupported act_fn {self.act_fn!r}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"{name} has {len(v)} values, latent_channels is {self.latent_channels}")

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class GroupNorm(nn.GroupNorm):
    """torch-compatible GroupNorm whose statistics and affine run in float32 (cast back after)."""

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-6):
        super().__init__(num_groups, dims, eps=eps, affine=True, pytorch_compatible=True)

    def __call__(self, x):
        return super().__call__(x.astype(mx.float32)).astype(x.dtype)


class Conv2d(nn.Conv2d):
    """nn.Conv2d that, given ``evaluate``, convolves a large feature map in horizontal slabs, one after another.

    MLX may unfold a convolution's input (9x its size for a 3x3 kernel): a 1024-channel 512x512 map would
    need gigabytes at once. Each slab reads its neighbours' rows, so the result is exact; each is evaluated
    before the next is built, since a lazy graph would schedule every slab's unfolding together.
    """

    max_unfold_bytes = 1 << 28

    def __call__(self, x, evaluate: Evaluate = None):
        n, h, w, c = x.shape
        k = self.weight.shape[1]
        row_bytes = n * w * c * k * self.weight.shape[2] * x.dtype.size
        if evaluate is None or k == 1 or self.stride != (1, 1) or self.dilation != 1 or h * row_bytes <= self.max_unfold_bytes:
            return super().__call__(x)
        rows = max(1, self.max_unfold_bytes // row_bytes)
        p, q = self.padding
        slabs = []
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            lo, hi = max(0, r0 - p), min(h, r1 + p)
            slab = mx.pad(x[:, lo:hi], [(0, 0), (p - (r0 - lo), p - (hi - r1)), (q, q), (0, 0)])
            slabs.append(mx.conv2d(slab, self.weight))
            evaluate(slabs[-1])
        out = mx.concatenate(slabs, axis=1)
        return out + self.bias if "bias" in self else out


def _conv(cin, cout, k=3, stride=1, padding=1):
    return Conv2d(cin, cout, kernel_size=k, stride=stride, padding=padding)


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, act):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin)
        self.conv1 = _conv(cin, cout)
        self.norm2 = GroupNorm(groups, cout)
        self.conv2 = _conv(cout, cout)
        self.act = act
        if cin != cout:
            self.conv_shortcut = _conv(cin, cout, k=1, padding=0)

    def __call__(self, x, evaluate: Evaluate = None):
        h = self.conv1(self.act(self.norm1(x)), evaluate)
        h = self.conv2(self.act(self.norm2(h)), evaluate)
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """diffusers' single-head spatial self-attention of the mid block (group norm, residual)."""

    def __init__(self, dims: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, dims)
        self.to_q = nn.Linear(dims, dims)
        self.to_k = nn.Linear(dims, dims)
        self.to_v = nn.Linear(dims, dims)
        self.to_out = [nn.Linear(dims, dims)]

    # Largest score matrix (queries x keys, float32) one attention call may build: 2048x2048 pixels is
    # 65536 tokens, whose full matrix would be 17 GB; rows are independent so chunking the queries is exact.
    max_scores_bytes = 1 << 30
    min_chunk = 256

    def __call__(self, x, evaluate: Evaluate = None):
        B, H, W, C = x.shape
        N = H * W
        h = self.group_norm(x).reshape(B, 1, N, C)
        # diffusers upcasts the softmax; do the whole (one-head) attention in float32
        q, k, v = (p(h).astype(mx.float32) for p in (self.to_q, self.to_k, self.to_v))
        chunk = max(self.min_chunk, self.max_scores_bytes // (4 * N * B))
        if evaluate is None or chunk >= N:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=C**-0.5)
        else:
            parts = []
            for s in range(0, N, chunk):
                part = mx.fast.scaled_dot_product_attention(q[:, :, s : s + chunk], k, v, scale=C**-0.5)
                evaluate(part)  # one chunk's scores alive at a time
                parts.append(part)
            out = mx.concatenate(parts, axis=2)
        return x + self.to_out[0](out.astype(x.dtype)).reshape(B, H, W, C)


class Downsample2D(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.conv = _conv(dims, dims, stride=2, padding=0)

    def __call__(self, x, evaluate: Evaluate = None):
        # diffusers pads right/bottom by one (padding=0 + F.pad (0, 1, 0, 1)) before the stride-2 conv
        x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.conv = _conv(dims, dims)

    def __call__(self, x, evaluate: Evaluate = None):
        B, H, W, C = x.shape
        # nearest x2
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, H * 2, W * 2, C)
        return self.conv(x, evaluate)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, cin, cout, num_layers, groups, act, add_downsample):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups, act) for i in range(num_layers)]
        if add_downsample:
            self.downsamplers = [Downsample2D(cout)]

    def __call__(self, x, evaluate: Evaluate = None):
        for r in self.resnets:
            x = r(x, evaluate)
        if "downsamplers" in self:
            x = self.downsamplers[0](x, evaluate)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin, cout, num_layers, groups, act, add_upsample):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups, act) for i in range(num_layers)]
        if add_upsample:
            self.upsamplers = [Upsample2D(cout)]

    def __call__(self, x, evaluate: Evaluate = None):
        for r in self.resnets:
            x = r(x, evaluate)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, evaluate)
        return x


class UNetMidBlock2D(nn.Module):
    def __init__(self, dims, groups, act, add_attention):
        super().__init__()
        self.resnets = [ResnetBlock2D(dims, dims, groups, act) for _ in range(2)]
        self.attentions = [Attention(dims, groups)] if add_attention else []

    def __call__(self, x, evaluate: Evaluate = None):
        x = self.resnets[0](x, evaluate)
        if self.attentions:
            x = self.attentions[0](x, evaluate)
        return self.resnets[1](x, evaluate)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch, groups, act = cfg.block_out_channels, cfg.norm_num_groups, activation(cfg.act_fn)
        self.conv_in = _conv(cfg.in_channels, ch[0])
        self.down_blocks = [
            DownEncoderBlock2D(
                ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, act, add_downsample=i < len(ch) - 1
            )
            for i in range(len(ch))
        ]
        self.mid_block = UNetMidBlock2D(ch[-1], groups, act, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, ch[-1])
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels)  # double_z: mean and log-variance
        self.act = act

    def __call__(self, x, evaluate: Evaluate = None):
        x = self.conv_in(x, evaluate)
        for b in self.down_blocks:
            x = b(x, evaluate)
        x = self.mid_block(x, evaluate)
        return self.conv_out(self.act(self.conv_norm_out(x)), evaluate)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch, groups, act = cfg.block_out_channels, cfg.norm_num_groups, activation(cfg.act_fn)
        rev = list(reversed(ch))
        self.conv_in = _conv(cfg.latent_channels, ch[-1])
        self.mid_block = UNetMidBlock2D(ch[-1], groups, act, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(
                rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, groups, act, add_upsample=i < len(ch) - 1
            )
            for i in range(len(ch))
        ]
        self.conv_norm_out = GroupNorm(groups, ch[0])
        self.conv_out = _conv(ch[0], cfg.out_channels)
        self.act = act

    def __call__(self, z, evaluate: Evaluate = None):
        x = self.mid_block(self.conv_in(z, evaluate), evaluate)
        for b in self.up_blocks:
            x = b(x, evaluate)
            if evaluate is not None:
                # bounds the live graph to one block's activations (the high-resolution blocks dominate)
                evaluate(x)
        return self.conv_out(self.act(self.conv_norm_out(x)), evaluate)


class AutoencoderKL(PretrainedModel):
    """``encode`` gives the latent mode (the posterior mean) and ``decode`` the image, both NCHW; the ``_nhwc``
    forms are MLX's layout (what tiling works on)."""

    component = "vae"
    config_class = AutoencoderKLConfig
    full_precision_note = "convolutions only (0.8 GB)"

    def __init__(self, config: AutoencoderKLConfig | dict | None = None):
        super().__init__()
        self.config = config = self.as_config(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = _conv(2 * config.latent_channels, 2 * config.latent_channels, k=1, padding=0)
        if config.use_post_quant_conv:
            self.post_quant_conv = _conv(config.latent_channels, config.latent_channels, k=1, padding=0)

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv_in.weight.dtype

    def _check(self, x: mx.array, channels: int, what: str, multiple: int = 1):
        if not isinstance(x, mx.array):
            raise ValueError(f"{what} must be an mlx array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{what} must be 4-D (batch, channels, height, width), got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{what} must have {channels} channels (NCHW), got shape {tuple(x.shape)}")
        if x.shape[2] < 1 or x.shape[3] < 1 or x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(
                f"{what} height and width must be positive multiples of {multiple}, got {x.shape[2]}x{x.shape[3]}"
            )

    def encode_nhwc(self, x: mx.array, evaluate: Evaluate = None) -> mx.array:
        """(B, H, W, 3) -> (B, H/8, W/8, 2 * latent_channels) moments (mean, then log-variance)."""
        h = self.encoder(x, evaluate)
        return self.quant_conv(h) if "quant_conv" in self else h

    def decode_nhwc(self, z: mx.array, evaluate: Evaluate = None) -> mx.array:
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z, evaluate)

    def encode(self, x: mx.array, evaluate: Evaluate = None) -> mx.array:
        """(B, 3, H, W) image in [-1, 1] -> (B, latent_channels, H/8, W/8) posterior mean (diffusers' 'argmax')."""
        self._check(x, self.config.in_channels, "image", multiple=self.scale_factor)
        moments = self.encode_nhwc(x.transpose(0, 2, 3, 1).astype(self.dtype), evaluate)
        return moments[..., : self.config.latent_channels].transpose(0, 3, 1, 2)

    def decode(self, z: mx.array, evaluate: Evaluate = None) -> mx.array:
        """(B, latent_channels, h, w) latents (denormalized) -> (B, 3, 8h, 8w) image in about [-1, 1]."""
        self._check(z, self.config.latent_channels, "latents")
        return self.decode_nhwc(z.transpose(0, 2, 3, 1).astype(self.dtype), evaluate).transpose(0, 3, 1, 2)

    # -- latent normalization (the pipeline's, with latents_mean / latents_std) -------------------------

    def _stats(self, z):
        cfg = self.config
        if cfg.latents_mean is None or cfg.latents_std is None:
            raise ValueError("this VAE config has no latents_mean / latents_std")
        if z.ndim != 4 or z.shape[1] != cfg.latent_channels:
            raise ValueError(f"latents must be (B, {cfg.latent_channels}, h, w), got shape {tuple(z.shape)}")
        mean = mx.array(cfg.latents_mean, dtype=z.dtype).reshape(1, -1, 1, 1)
        std = mx.array(cfg.latents_std, dtype=z.dtype).reshape(1, -1, 1, 1)
        return mean, std

    def normalize_latents(self, z: mx.array) -> mx.array:
        """After encoding: (z - mean) / std."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: mx.array) -> mx.array:
        """Before decoding: z * std + mean."""
        mean, std = self._stats(z)
        return z * std + mean

    # -- loading ----------------------------------------------------------------------------------------

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """torch OIHW conv kernels -> MLX OHWI; old attention names (query/key/value/proj_attn) -> to_q/...

        Whether a folder holds torch or MLX kernels is decided once for the whole folder from the kernels whose
        layout is unambiguous (a 3x3 kernel with 3 input channels looks the same both ways), so an
        already-converted MLX folder loads unchanged.
        """
        from mlx.utils import tree_flatten

        expected = dict(tree_flatten(self.parameters()))
        renamed = {}
        for k, v in weights.items():
            for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                             (".proj_attn.", ".to_out.0.")):
                k = k.replace(old, new)
            # deprecated attention blocks stored their projections as 1x1 convs
            if ".attentions." in k and k.endswith("weight") and v.ndim == 4 and k in expected and expected[k].ndim == 2:
                v = v.reshape(v.shape[0], v.shape[1])
            renamed[k] = v
        torch_votes = mlx_votes = 0
        for k, v in renamed.items():
            if v.ndim != 4 or k not in expected:
                continue
            as_mlx = tuple(v.shape) == tuple(expected[k].shape)
            as_torch = tuple(v.transpose(0, 2, 3, 1).shape) == tuple(expected[k].shape)
            if as_torch and not as_mlx:
                torch_votes += 1
            elif as_mlx and not as_torch:
                mlx_votes += 1
        if torch_votes and mlx_votes:
            raise ValueError("the VAE weights mix torch (OIHW) and MLX (OHWI) convolution layouts")
        if mlx_votes:
            return renamed
        return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in renamed.items()}

    @classmethod
    def load_dtype(cls, config: AutoencoderKLConfig, dtype):
        if dtype is not None and dtype == mx.float16 and config.force_upcast:
            # force_upcast: this VAE overflows in float16; diffusers pipelines that honour the flag run it in
            # float32 (bfloat16 has float32's range and is kept as asked)
            return mx.float32
        return dtype
