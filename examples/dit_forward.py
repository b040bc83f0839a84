"""The diffusion transformer alone, the way diffusers' pipeline drives it: a conditional and an unconditional
forward, classifier-free guidance, one Euler step. Random inputs; load real weights with --model.

    python examples/dit_forward.py --model glm-image-4bit/transformer
"""

import argparse

import mlx.core as mx

from mlx_glm_image import GlmImageTransformer2DModel, load_model
from mlx_glm_image.pipeline.denoise import classifier_free_guidance, queued_steps
from mlx_glm_image.models import released
from mlx_glm_image.pipeline.flow import FlowMatchEulerSampler
from mlx_glm_image.scheduler import SchedulerConfig

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a transformer/ folder (diffusers or converted)")
parser.add_argument("--size", type=int, default=1024)
args = parser.parse_args()

dit = load_model(GlmImageTransformer2DModel, args.model, dtype="bfloat16")
latent = args.size // 8
rows, cols = dit.config.token_grid(latent, latent)
tokens = rows * cols
sampler = FlowMatchEulerSampler(SchedulerConfig.from_dict(released.config("scheduler")), image_seq_len=tokens)

x = mx.random.normal((1, dit.config.in_channels, latent, latent), key=mx.random.key(0))
glyphs = mx.random.normal((1, 12, dit.config.text_embed_dim)) * 0.1  # stand-in for ByT5 embeddings
prior_ids = mx.random.randint(0, dit.config.prior_vq_quantizer_codebook_size, (1, tokens))
common = dict(prior_token_id=prior_ids, timestep=mx.array([sampler.model_timestep(0)]),
              target_size=mx.array([[args.size, args.size]]), crop_coords=mx.zeros((1, 2)), return_dict=False)
# queued_steps: bounded memory, a block's attention or feed-forward step at a time, the next one already queued
v_cond = dit(x, glyphs, prior_token_drop=mx.zeros(prior_ids.shape, mx.bool_), step_hook=queued_steps(), **common)[0]
v_uncond = dit(x, glyphs[:, :1] * 0, prior_token_drop=mx.ones(prior_ids.shape, mx.bool_), step_hook=queued_steps(),
               **common)[0]
x = sampler.step(classifier_free_guidance(v_cond.astype(mx.float32), v_uncond.astype(mx.float32), 1.5), 0, x)
mx.eval(x)
print(f"one guided step at {args.size}x{args.size}: peak memory {mx.get_peak_memory() / 1e9:.2f} GB")
