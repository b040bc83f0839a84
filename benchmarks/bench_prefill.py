"""A long prompt into the AR prior model: prefill time and peak memory, the prompt in PREFILL_CHUNK steps (as
generation runs it) against one step (the whole prompt x prompt attention at once), each in its own process.

    python benchmarks/bench_prefill.py --tokens 2000 8000 --config reduced

Random weights at the given config (common.py), float32 on the CPU, the 64x64 grid suffix; the time is the
prefill and the first token.
"""

from __future__ import annotations

import argparse
import time

import common

ROOT = common.ROOT
WHOLE = 10**9  # one step: no prompt is that long


def run_worker(args) -> dict:
    common.use_checkout()
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_map

    from mlx_glm_image.models.ar import GlmImageConfig, GlmImageForConditionalGeneration
    from mlx_glm_image.pipeline import prior_grid, prior_tokens
    from mlx_glm_image.pipeline.processor import TargetGrids
    from mlx_glm_image.pipeline.sample_utils import make_sampler

    mx.set_default_device(mx.cpu)
    prior_tokens.PREFILL_CHUNK = args.inputs["chunk"]
    cfg = common.config("vision_language_encoder", args.config)
    model = GlmImageForConditionalGeneration(GlmImageConfig.from_dict(cfg))
    model.update(tree_map(lambda p: mx.random.normal(p.shape, scale=0.02), model.parameters()))
    mx.eval(model.parameters())
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    n = args.inputs["tokens"]
    text = np.random.default_rng(0).integers(20000, 160000, n).tolist()
    # then the 64x64 suffix: <grid_bos>2 2<grid_eos><grid_bos>16 16<grid_eos><bos> (digits stand-ins)
    ids = np.array([text + [167845, 2, 2, 167846, 167845, 16, 16, 167846, cfg["image_start_token_id"]]])
    prompt = prior_grid.PriorPrompt(
        inputs={"input_ids": ids, "attention_mask": np.ones_like(ids), "image_grid_thw": np.array([[1, 2, 2], [1, 16, 16]]),
                "images_per_sample": np.array([2])},
        grids=TargetGrids((2, 2), (16, 16)))
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    next(prior_grid.prior_sequences(model, prompt, make_sampler(top_k=1), mx.random.key(0)))
    return dict(seconds=time.perf_counter() - t0, peak_gb=(mx.get_peak_memory() - weights) / 1e9,
                weights_gb=weights / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2000, 8000])
    p.add_argument("--config", choices=common.variants("vision_language_encoder"), default="reduced")
    common.add_worker_arguments(p, ["mlx"])
    args = p.parse_args()
    if args.worker:
        common.report(run_worker(args))
        return
    print(f"AR prior model ({args.config}), float32, CPU: prefill + first token; peak = MLX peak less the weights")
    for n in args.tokens:
        for chunk in (WHOLE, 512):
            r = common.run_worker(__file__, "mlx", ["--config", args.config], mlx=True,
                                  inputs={"tokens": n, "chunk": chunk}, label=f"{n} tokens, chunk {chunk}")
            if r:
                name = "one step" if chunk == WHOLE else f"{chunk}-token steps"
                print(f"{n:>6} tokens, {name:>16}: {r['seconds']:6.2f} s, peak {r['peak_gb']:6.2f} GB "
                      f"(weights {r['weights_gb']:.2f} GB)", flush=True)


if __name__ == "__main__":
    main()
