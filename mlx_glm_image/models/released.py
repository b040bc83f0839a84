"""The released zai-org/GLM-Image configuration files (docs/checkpoint.md), as plain JSON values.

The config classes' defaults are the references' (what transformers and diffusers read when a field is absent),
so that a config.json is read exactly as the references read it; the released checkpoint names every value, and
these are they. They stand in where no config.json is at hand: --check's figures when the Hub does not answer,
and the benchmarks' released sizes.
"""

from __future__ import annotations

import copy

LATENTS_MEAN = [-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875, -0.9453125,
                0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125, -1.59375, -0.81640625,
                -0.255859375]
LATENTS_STD = [3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875, 2.71875,
               2.390625, 2.390625, 2.453125, 2.25, 2.15625]

_CONFIGS = {
    "transformer": {
        "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 30, "attention_head_dim": 128,
        "num_attention_heads": 32, "text_embed_dim": 1472, "time_embed_dim": 512, "condition_dim": 256,
        "prior_vq_quantizer_codebook_size": 16384,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 512, 1024, 1024],
        "layers_per_block": 3, "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
        "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": LATENTS_MEAN, "latents_std": LATENTS_STD,
        "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False,
    },
    "text_encoder": {
        "vocab_size": 384, "d_model": 1472, "d_kv": 64, "d_ff": 3584, "num_layers": 12, "num_heads": 6,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
    },
    "vision_language_encoder": {
        "text_config": {
            "vocab_size": 168064, "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
            "num_attention_heads": 32, "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "attention_bias": True, "vision_vocab_size": 16512, "pad_token_id": 167841, "eos_token_id": 16385,
            "max_position_embeddings": 131072,
            # the released file sets the rotary share here: transformers' fallback is 1.0 (docs/checkpoint.md)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "mrope_section": [8, 12, 12]},
        },
        "vision_config": {
            "depth": 40, "hidden_size": 1536, "hidden_act": "gelu", "attention_bias": True, "num_heads": 16,
            "in_channels": 3, "image_size": 2048, "patch_size": 16, "spatial_merge_size": 1, "intermediate_size": 6144,
            "layer_norm_eps": 1e-6,
        },
        "vq_config": {"embed_dim": 2048, "num_embeddings": 16384, "latent_channels": 1536, "in_channels": 3},
        "image_token_id": 167855, "image_start_token_id": 16384, "image_end_token_id": 16385,
    },
    "scheduler": {
        "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.25,
        "max_shift": 0.75, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
        "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "time_shift_type": "linear", "stochastic_sampling": False,
    },
}

COMPONENTS = tuple(_CONFIGS)


def config(component: str) -> dict:
    """The released ``<component>/config.json`` (``scheduler``: its scheduler_config.json); a copy."""
    return copy.deepcopy(_CONFIGS[component])
