"""A config.json read as the references read it: every field absent from it takes the reference's default.

Our config classes against transformers' (GlmImageTextConfig, GlmImageVisionConfig, GlmImageVQVAEConfig,
GlmImageConfig, T5Config) and diffusers' (GlmImageTransformer2DModel, AutoencoderKL,
FlowMatchEulerDiscreteScheduler: what ``register_to_config`` records for a missing key is the ``__init__`` default),
field by field. The released values live apart (models/released.py) and are read through the same classes.
"""

import dataclasses
import inspect

import pytest

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from transformers.models.glm_image import configuration_glm_image as ref_glm  # noqa: E402
from transformers.models.glm_image.modeling_glm_image import GlmImageTextRotaryEmbedding  # noqa: E402

from mlx_glm_image.models import released  # noqa: E402
from mlx_glm_image.models.base import config_from_dict  # noqa: E402
from mlx_glm_image.models.ar.config import GlmImageConfig, TextConfig, VisionConfig, VQConfig  # noqa: E402
from mlx_glm_image.models.dit import GlmImageTransformerConfig  # noqa: E402
from mlx_glm_image.models.t5 import T5Config  # noqa: E402
from mlx_glm_image.models.vae import AutoencoderKLConfig  # noqa: E402
from mlx_glm_image.scheduler import SchedulerConfig  # noqa: E402

# Ours, not the reference's: how a converted folder was quantized; the AR's rope keys, compared below as what the
# model computes with; T5's two derived fields, compared as they come out of feed_forward_proj.
NOT_KEYS = {"quantization", "text_config", "vision_config", "vq_config", "rope_parameters", "rope_theta",
            "partial_rotary_factor", "rope_scaling", "head_dim"}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _init_defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


CASES = [
    (TextConfig, lambda: vars(ref_glm.GlmImageTextConfig())),
    (VisionConfig, lambda: vars(ref_glm.GlmImageVisionConfig())),
    (VQConfig, lambda: vars(ref_glm.GlmImageVQVAEConfig())),
    (GlmImageConfig, lambda: vars(ref_glm.GlmImageConfig())),
    (T5Config, lambda: vars(transformers.T5Config())),
    (GlmImageTransformerConfig, lambda: _init_defaults(diffusers.GlmImageTransformer2DModel)),
    (AutoencoderKLConfig, lambda: _init_defaults(diffusers.AutoencoderKL)),
    (SchedulerConfig, lambda: _init_defaults(diffusers.FlowMatchEulerDiscreteScheduler)),
]


@pytest.mark.parametrize("ours,reference", CASES, ids=[c.__name__ for c, _ in CASES])
def test_every_absent_field_reads_as_the_reference_reads_it(ours, reference):
    read = config_from_dict(ours, {})
    ref = reference()
    compared = []
    for f in dataclasses.fields(ours):
        if f.name in NOT_KEYS:
            continue
        assert f.name in ref, f"{ours.__name__}.{f.name} is not a field of the reference"
        assert _plain(getattr(read, f.name)) == _plain(ref[f.name]), f.name
        compared.append(f.name)
    assert len(compared) >= 3


def test_the_text_models_rotary_defaults_are_transformers():
    """No rope_parameters at all: transformers rotates the whole head (factor 1.0) with sections [8, 12, 12] and
    theta 1e4. That pair cannot run (the sections sum to 32, a 128-wide head has 64 frequencies): transformers
    fails at the first forward, ours when the model is built, in one line (docs/checkpoint.md)."""
    ref = ref_glm.GlmImageTextConfig()
    rotary = GlmImageTextRotaryEmbedding(ref)
    ours = config_from_dict(TextConfig, {})
    assert ours.rotary_dim == 2 * rotary.inv_freq.numel() == 128
    assert ours.mrope_section == rotary.mrope_section == [8, 12, 12]
    assert ours.rope_theta_value == ref.rope_parameters["rope_theta"]
    from mlx_glm_image.models.ar.text_model import GlmImageTextModel

    with pytest.raises(ValueError, match=r"mrope_section \[8, 12, 12\] must sum to rotary_dim/2 = 64"):
        GlmImageTextModel(config_from_dict(TextConfig, {"num_hidden_layers": 1, "vocab_size": 8}))


@pytest.mark.parametrize("keys", [
    {"rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2]}, "head_dim": 16},
    {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]}},
    {"partial_rotary_factor": 0.5, "rope_theta": 500.0, "rope_parameters": {"mrope_section": [4, 6, 6]}},
    {"rope_parameters": {"partial_rotary_factor": 0.25, "rope_type": "default"}, "partial_rotary_factor": 0.5},
    {"rope_scaling": {"rope_type": "default", "mrope_section": [1, 2, 3]},
     "rope_parameters": {"rope_type": "default", "rope_theta": 3.0}},
])
def test_the_rope_keys_are_read_as_transformers_reads_them(keys):
    """Where the share and theta may stand (rope_parameters, the older top-level keys, rope_scaling) and which wins."""
    base = {"hidden_size": 128, "num_attention_heads": 4}
    ref_config = ref_glm.GlmImageTextConfig(**base, **{k: dict(v) if isinstance(v, dict) else v for k, v in keys.items()})
    rotary = GlmImageTextRotaryEmbedding(ref_config)
    ours = config_from_dict(TextConfig, {**base, **keys})
    assert ours.rotary_dim == 2 * rotary.inv_freq.numel()
    assert ours.mrope_section == list(rotary.mrope_section)
    assert ours.rope_theta_value == ref_config.rope_parameters["rope_theta"]


@pytest.mark.parametrize("component", released.COMPONENTS)
def test_the_released_configs_name_every_field(component):
    """The released files name every value, so the released model never depends on a default."""
    classes = {"transformer": GlmImageTransformerConfig, "vae": AutoencoderKLConfig, "text_encoder": T5Config,
               "scheduler": SchedulerConfig, "vision_language_encoder": GlmImageConfig}
    config = released.config(component)
    nested = {"text_config": TextConfig, "vision_config": VisionConfig, "vq_config": VQConfig}
    for cls, keys in [(classes[component], config)] + [(nested[k], v) for k, v in config.items() if k in nested]:
        missing = {f.name for f in dataclasses.fields(cls)} - NOT_KEYS - {"dense_act_fn", "is_gated_act"} - set(keys)
        assert not missing, (component, cls.__name__, missing)
    text = GlmImageConfig.from_dict(released.config("vision_language_encoder")).text_config
    assert (text.rotary_dim, text.mrope_section) == (64, [8, 12, 12])
