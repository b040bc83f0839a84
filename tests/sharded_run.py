"""Run under ``mlx.launch`` by tests/test_parallel.py: each rank loads the tiny checkpoint whole and split, and
rank 0 prints the largest differences as JSON. ``tensor`` mode: the AR text model's hidden states split over every
rank (with 4 ranks and 2 KV heads, the KV projections are replicated); ``cfg,tensor``: a whole denoising run from
given prior tokens (the AR model is skipped) through the pipeline, against a one-process pipeline in this process."""

import json
import sys

import mlx.core as mx
import numpy as np

from mlx_glm_image import GlmImagePipeline, load_model
from mlx_glm_image.models import GlmImageForConditionalGeneration
from mlx_glm_image.quantize import QuantSpec
from mlx_glm_image.sharding import Split

root, mode, quantized = sys.argv[1], sys.argv[2], sys.argv[3:]  # quantized: a converted 4-bit folder of the AR model
group = mx.distributed.init()
out = {}
split = Split(group, size=group.size(), rank=group.rank())
ids = mx.array([[1, 2, 3, 4, 5, 6, 7]])
pos = mx.broadcast_to(mx.arange(7)[None, None], (3, 1, 7))


def hidden_states(source, **load):
    whole = load_model(GlmImageForConditionalGeneration, source, dtype="float32", **load)
    part = load_model(GlmImageForConditionalGeneration, source, dtype="float32", split=split, **load)
    a, b = whole.model.language_model(ids, pos, None, None), part.model.language_model(ids, pos, None, None)
    return float(mx.abs(a - b).max() / mx.abs(a).max()), part


out["ar_relative"], part = hidden_states(root)
out["ar_kv_heads_per_rank"] = part.model.language_model.layers[0].self_attn.n_kv_heads
if quantized:
    out["ar_load_time_4bit_relative"], part = hidden_states(root, quantize=QuantSpec(4, 32))
    out["ar_converted_4bit_relative"], part = hidden_states(quantized[0])
    out["ar_layer"] = type(part.model.language_model.layers[0].mlp.down_proj).__name__
if mode == "cfg,tensor":
    args = dict(prompt='a red cat "big"', prior_token_ids=mx.array(np.random.default_rng(0).integers(0, 40, (1, 16))),
                height=64, width=64, num_inference_steps=3, guidance_scale=2.5, generator=3, output_type="np")
    one = GlmImagePipeline.from_pretrained(root, dtype="float32")(**args).images
    split_pipe = GlmImagePipeline.from_pretrained(root, dtype="float32", parallel="cfg,tensor")
    many = split_pipe(**args).images
    if group.rank() == 0:  # the rank that decodes
        out["image_max_pixel"] = float(np.abs(np.asarray(one) - np.asarray(many)).max() * 255)
    block = split_pipe.transformer.transformer_blocks[0]
    out["dit_layer"] = type(block.attn1.to_out[0]).__name__
if group.rank() == 0:
    print(json.dumps(out), flush=True)
mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))  # the others wait for rank 0's decode
