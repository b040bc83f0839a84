"""One DiT forward: the MLX port against diffusers, each side in its own process, same machine.

    # CPU, reduced width, fp32 (MLX gets OpenBLAS preloaded if it is installed)
    python benchmarks/bench_transformer.py --device cpu --config reduced --sizes 512
    # CUDA GPU, released config, bf16 (MLX's CUDA backend; torch eager and torch.compile)
    python benchmarks/bench_transformer.py --device gpu --config released --sizes 1024 2048 --torch-compile

Prints ms per forward (median), peak memory and the MLX/torch ratio per image size. Weights are random:
speed and memory do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import common

CONFIGS = common.variants("transformer")  # "released", and common.SMALLER's "reduced" (8 heads x 128, 4 layers)
TEXT_LEN = 64
# how the MLX forward is executed: one lazy graph; evaluated step by step (a block's attention, then its
# feed-forward) with the next step already queued (the pipeline's default); or step by step, each waited for
# before the next is encoded
VARIANTS = ["lazy", "eval-per-block", "eval-per-block-sync"]


def inputs_np(size: int, cfg: dict, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    lat = size // 8
    tokens = (lat // cfg["patch_size"]) ** 2
    return dict(
        hidden_states=rng.standard_normal((1, cfg["in_channels"], lat, lat), dtype=np.float32),
        encoder_hidden_states=rng.standard_normal((1, TEXT_LEN, cfg["text_embed_dim"]), dtype=np.float32),
        prior_token_id=rng.integers(0, cfg["prior_vq_quantizer_codebook_size"], (1, tokens)),
        prior_token_drop=np.zeros((1, tokens), dtype=bool),
        timestep=np.array([500.0], dtype=np.float32),
        target_size=np.array([[size, size]], dtype=np.float32),
        crop_coords=np.zeros((1, 2), dtype=np.float32),
    )


def timed(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def worker_mlx(args) -> list[dict]:
    common.use_checkout()
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_glm_image import GlmImageTransformer2DModel
    from mlx_glm_image import quantize as Q
    from mlx_glm_image.pipeline.denoise import queued_steps

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    dtype = getattr(mx, args.dtype)
    cfg = args.inputs
    model = GlmImageTransformer2DModel(cfg)
    # cast block by block so the fp32 initialisation never exists for the whole model at once
    for block in model.transformer_blocks:
        block.update(tree_map(lambda p: p.astype(dtype), block.parameters()))
        mx.eval(block.parameters())
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    if args.quantize:  # as the pipeline quantizes it: the model's own predicate
        Q.quantize_model(model, Q.as_spec(args.quantize))
    mx.eval(model.parameters())
    weights_gb = mx.get_active_memory() / 1e9

    rows = []
    for size in args.sizes:
        kw = {k: mx.array(v) for k, v in inputs_np(size, cfg).items()}
        if args.ops:
            rows += profile_ops(mx, size, cfg, dtype)
        for variant in args.mlx_variants:
            in_flight = {"lazy": None, "eval-per-block": 2, "eval-per-block-sync": 1}[variant]

            def forward():
                hook = queued_steps(in_flight) if in_flight else None  # the denoising loop's step hook
                mx.eval(model(**kw, return_dict=False, step_hook=hook)[0])

            mx.synchronize()
            mx.clear_cache()
            mx.reset_peak_memory()
            ms = timed(forward, args.warmup, args.iters)
            rows.append(dict(side="mlx", variant=variant + (f"-q{args.quantize}" if args.quantize else ""),
                             size=size, ms=ms, peak_gb=mx.get_peak_memory() / 1e9, weights_gb=weights_gb))
    return rows


def profile_ops(mx, size, cfg, dtype) -> list[dict]:
    """Where a block's time goes: its GEMMs and its attention alone, as achieved TFLOP/s."""
    tokens = (size // 8 // cfg["patch_size"]) ** 2 + TEXT_LEN
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    dim = heads * head_dim
    x = mx.random.normal((1, tokens, dim)).astype(dtype)
    w_qkv = mx.random.normal((3 * dim, dim)).astype(dtype) * 0.01
    w_ff = mx.random.normal((4 * dim, dim)).astype(dtype) * 0.01
    q = mx.random.normal((1, heads, tokens, head_dim)).astype(dtype)
    mx.eval(x, w_qkv, w_ff, q)
    ops = {
        "gemm qkv": (lambda: mx.eval(x @ w_qkv.T), 2 * tokens * dim * 3 * dim),
        "gemm ff-up": (lambda: mx.eval(x @ w_ff.T), 2 * tokens * dim * 4 * dim),
        "sdpa": (lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, q, q, scale=head_dim**-0.5)), 4 * tokens * tokens * dim),
    }
    rows = []
    for name, (fn, flops) in ops.items():
        ms = timed(fn, 3, 10)
        rows.append(dict(side="mlx-op", variant=name, size=size, ms=ms, peak_gb=flops / ms / 1e9, weights_gb=0))
    return rows


def worker_torch(args) -> list[dict]:
    import torch
    from diffusers import GlmImageTransformer2DModel as TorchDiT

    device = "cuda" if args.device == "gpu" else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    cfg = args.inputs
    with torch.device(device):
        model = TorchDiT(**common.reference_kwargs(cfg, TorchDiT)).to(dtype).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    weights_gb = torch.cuda.memory_allocated() / 1e9 if device == "cuda" else float("nan")
    variants = ["eager"] + (["compile"] if args.torch_compile else [])
    rows = []
    for size in args.sizes:
        kw = {k: torch.from_numpy(v).to(device) for k, v in inputs_np(size, cfg).items()}
        kw["hidden_states"] = kw["hidden_states"].to(dtype)
        kw["encoder_hidden_states"] = kw["encoder_hidden_states"].to(dtype)
        for variant in variants:
            fwd = torch.compile(model) if variant == "compile" else model

            def run():
                fwd(**kw, return_dict=False)
                sync()

            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            ms = timed(run, args.warmup + (2 if variant == "compile" else 0), args.iters)
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated() / 1e9
            else:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process high-water mark
            rows.append(dict(side="torch", variant=variant, size=size, ms=ms, peak_gb=peak, weights_gb=weights_gb))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--config", choices=CONFIGS, default="reduced")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sizes in pixels (square)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: float32 on the CPU, bfloat16 on a GPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--mlx-variants", nargs="+", default=["lazy", "eval-per-block"], choices=VARIANTS)
    parser.add_argument("--quantize", type=int, choices=[4, 8], default=None,
                        help="MLX side: quantize the model as the pipeline does (its own predicate)")
    parser.add_argument("--sides", nargs="+", default=["torch", "mlx"], choices=["torch", "mlx"])
    parser.add_argument("--ops", action="store_true", help="MLX side: also time one block's GEMMs and attention alone")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    common.add_worker_arguments(parser, ["mlx", "torch"])
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    if args.worker:
        common.report((worker_mlx if args.worker == "mlx" else worker_torch)(args))
        return

    argv = ["--device", args.device, "--config", args.config, "--dtype", args.dtype, "--sizes", *map(str, args.sizes),
            "--warmup", str(args.warmup), "--iters", str(args.iters), "--mlx-variants", *args.mlx_variants]
    if args.torch_compile:
        argv.append("--torch-compile")
    if args.quantize:
        argv += ["--quantize", str(args.quantize)]
    if args.ops:
        argv.append("--ops")
    rows = []
    for side in args.sides:
        rows += common.run_worker(__file__, side, argv, mlx=side == "mlx", device=args.device,
                                  inputs=common.config("transformer", args.config)) or []

    print(f"\nDiT forward, config={args.config}, dtype={args.dtype}, device={args.device}, text tokens={TEXT_LEN}")
    print(f"{'size':>6} {'side':>6} {'variant':>16} {'ms':>10} {'peak GB':>9} {'vs torch eager':>15}")
    for size in args.sizes:
        base = next((r["ms"] for r in rows if r["size"] == size and r["side"] == "torch" and r["variant"] == "eager"), None)
        for r in (r for r in rows if r["size"] == size):
            if r["side"] == "mlx-op":  # peak_gb holds TFLOP/s for these rows
                print(f"{size:>6} {'op':>6} {r['variant']:>16} {r['ms']:>10.2f} {r['peak_gb']:>7.1f} TFLOP/s")
                continue
            ratio = f"{r['ms'] / base:.2f}x" if base else "-"
            print(f"{size:>6} {r['side']:>6} {r['variant']:>16} {r['ms']:>10.1f} {r['peak_gb']:>9.2f} {ratio:>15}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
