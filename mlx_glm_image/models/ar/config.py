"""Configuration of the AR prior model (the checkpoint's ``vision_language_encoder/config.json``).

Three nested blocks as transformers writes them: ``text_config`` (the GLM-4-style decoder), ``vision_config`` (the
ViT used for image editing) and ``vq_config`` (the quantizer that turns ViT features into image tokens).
Unknown keys are ignored so that newer configs still load. Defaults: transformers' (what it reads when a key is
absent), as every config class here; the released values are in ``released.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import config_from_dict


@dataclass
class TextConfig:
    vocab_size: int = 168064
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    vision_vocab_size: int = 16512
    pad_token_id: int | None = 167841
    eos_token_id: int | list[int] | None = 16385
    max_position_embeddings: int = 131072
    rope_parameters: dict | None = None
    # older configs keep these at the top level instead of in rope_parameters
    rope_theta: float | None = None
    partial_rotary_factor: float | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        # transformers' reading: an older rope_scaling replaces rope_parameters; the top-level keys fill what
        # neither names; the rotary share falls back to 1.0 and mrope_section to [8, 12, 12] (those two defaults do
        # not fit together: the released config names both, docs/checkpoint.md)
        rope = dict(self.rope_scaling or self.rope_parameters or {})
        rope.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else 10000.0)
        rope.setdefault("partial_rotary_factor", 1.0 if self.partial_rotary_factor is None else self.partial_rotary_factor)
        rope.setdefault("mrope_section", [8, 12, 12])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (GLM-Image uses 'default')")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (GLM-Image uses 'silu')")
        self.rope_parameters = rope

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_parameters["partial_rotary_factor"])

    @property
    def mrope_section(self) -> list[int]:
        return list(self.rope_parameters["mrope_section"])

    @property
    def rope_theta_value(self) -> float:
        return float(self.rope_parameters["rope_theta"])


@dataclass
class VisionConfig:
    depth: int = 40
    hidden_size: int = 1536
    hidden_act: str = "gelu"
    attention_bias: bool = True
    num_heads: int = 16
    in_channels: int = 3
    image_size: int = 2048
    patch_size: int = 16
    spatial_merge_size: int = 1
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = int(self.image_size[0])
        if isinstance(self.patch_size, (list, tuple)):
            self.patch_size = int(self.patch_size[0])
        if self.hidden_act not in ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "silu"):
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported")


@dataclass
class VQConfig:
    embed_dim: int = 2048
    num_embeddings: int = 16384
    latent_channels: int = 1536
    in_channels: int = 3


@dataclass
class GlmImageConfig:
    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    vq_config: VQConfig = field(default_factory=VQConfig)
    image_token_id: int = 167855
    image_start_token_id: int = 16384
    image_end_token_id: int = 16385
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "GlmImageConfig":
        d = dict(d)
        text = d.pop("text_config", None) or {}
        vision = d.pop("vision_config", None) or {}
        vq = d.pop("vq_config", None) or {}
        cfg = config_from_dict(cls, d)
        cfg.text_config = text if isinstance(text, TextConfig) else config_from_dict(TextConfig, text)
        cfg.vision_config = vision if isinstance(vision, VisionConfig) else config_from_dict(VisionConfig, vision)
        cfg.vq_config = vq if isinstance(vq, VQConfig) else config_from_dict(VQConfig, vq)
        return cfg
