"""VAE decode benchmark: mlx-glm-image vs diffusers AutoencoderKL, random weights at the released VAE config.

Each (side, size, tiling) runs in its own subprocess so that peak memory is that run's alone and the MLX
side may preload OpenBLAS on the CPU without slowing torch. One command prints the table:

    python benchmarks/bench_vae.py --device gpu --sizes 1024,2048 --dtype bfloat16     # CUDA machine
    python benchmarks/bench_vae.py --device cpu --sizes 256,512 --dtype float32        # this CPU

Peak memory: MLX ``mx.get_peak_memory()``; torch ``torch.cuda.max_memory_allocated()`` on GPU; on the CPU
both also report the process's max RSS (includes the interpreter and the weights).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import common


def vae_config(layers_per_block: int) -> dict:
    """The released vae/config.json (common.released); --layers-per-block changes that one value."""
    return dict(common.released("vae"), layers_per_block=layers_per_block)


def max_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


# ---------------------------------------------------------------------------------------------------------
# workers (one measurement each, JSON on the last stdout line)


def worker_mlx(args) -> dict:
    common.use_checkout()
    import mlx.core as mx

    from mlx_glm_image.models.vae import AutoencoderKL, AutoencoderKLConfig
    from mlx_glm_image.pipeline.decode import VaeTiling, decode

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[args.dtype]
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(vae_config(args.layers_per_block)))
    vae.set_dtype(dtype)
    tiling = VaeTiling(tile_sample_size=args.tile_size)
    mx.eval(vae.parameters())
    h = w = args.size // 8
    z = mx.random.normal((1, 16, h, w)).astype(dtype)
    mx.eval(z)
    tiled = args.tiled == "tiled"
    for _ in range(args.warmup):
        decode(vae, z, tiled=tiled, tiling=tiling)  # the pipeline's decode: evaluated, bounded memory
    mx.clear_cache()
    mx.reset_peak_memory()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = decode(vae, z, tiled=tiled, tiling=tiling)
        times.append(time.perf_counter() - t0)
    assert out.shape == (1, 3, args.size, args.size)
    return {"ms": 1000 * min(times), "peak_bytes": mx.get_peak_memory(), "rss_bytes": max_rss_bytes(),
            "device": str(mx.default_device())}


def worker_torch(args) -> dict:
    import torch
    from diffusers import AutoencoderKL

    torch.set_grad_enabled(False)
    device = "cuda" if args.device == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch has no CUDA device")
    dtype = getattr(torch, args.dtype)
    vae = AutoencoderKL(**common.reference_kwargs(vae_config(args.layers_per_block), AutoencoderKL))
    vae = vae.to(device=device, dtype=dtype).eval()
    if args.tiled == "tiled":
        vae.enable_tiling()
        vae.tile_sample_min_size = args.tile_size
        vae.tile_latent_min_size = args.tile_size // 8
        vae.tile_overlap_factor = 0.25
    h = w = args.size // 8
    z = torch.randn(1, 16, h, w, device=device, dtype=dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        vae.decode(z)
        sync()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        out = vae.decode(z).sample
        sync()
        times.append(time.perf_counter() - t0)
    assert tuple(out.shape) == (1, 3, args.size, args.size)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"ms": 1000 * min(times), "peak_bytes": peak, "rss_bytes": max_rss_bytes(),
            "device": str(torch.cuda.get_device_name() if device == "cuda" else "cpu")}


# ---------------------------------------------------------------------------------------------------------
# driver


def run_one(side: str, size: int, tiled: str, args) -> dict:
    argv = ["--size", size, "--tiled", tiled, "--device", args.device, "--dtype", args.dtype, "--layers-per-block",
            args.layers_per_block, "--tile-size", args.tile_size, "--repeats", args.repeats, "--warmup", args.warmup]
    result = common.run_worker(__file__, side, argv, mlx=side == "mlx", device=args.device, timeout=args.timeout,
                               openblas=args.openblas, label=f"{side} {size} {tiled}")
    return result if result is not None else {"error": "failed (see above)"}


def fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--sizes", default=None, help="comma-separated square sizes in pixels "
                    "(default: 1024,2048 on gpu, 256,512 on cpu)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: bfloat16 on gpu, float32 on cpu")
    ap.add_argument("--modes", default="untiled,tiled")
    ap.add_argument("--sides", default="mlx,torch")
    ap.add_argument("--layers-per-block", type=int, default=3)
    ap.add_argument("--tile-size", type=int, default=512, help="tile size in pixels (both sides)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    ap.add_argument("--no-openblas", dest="openblas", action="store_false")
    ap.add_argument("--json", default=None, help="also write the results here")
    # worker-only
    common.add_worker_arguments(ap, ["mlx", "torch"])
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tiled", choices=["tiled", "untiled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")

    if args.worker:
        common.report((worker_mlx if args.worker == "mlx" else worker_torch)(args))
        return

    sizes = [int(s) for s in (args.sizes or ("1024,2048" if args.device == "gpu" else "256,512")).split(",")]
    for s in sizes:
        if s % 8:
            raise SystemExit(f"size {s} is not a multiple of 8")
    modes = args.modes.split(",")
    sides = args.sides.split(",")
    cfg = vae_config(args.layers_per_block)
    print(f"VAE decode, random weights, the released config (block_out_channels "
          f"[{','.join(map(str, cfg['block_out_channels']))}], "
          f"{'a' if cfg['mid_block_add_attention'] else 'no'} mid-block attention, "
          f"{'with' if cfg['use_quant_conv'] or cfg['use_post_quant_conv'] else 'no'} quant convs), layers_per_block "
          f"{args.layers_per_block}, {args.dtype}, device {args.device}, tile {args.tile_size}px / 25% overlap, "
          f"best of {args.repeats} after {args.warmup} warmup", flush=True)
    header = f"{'side':6} {'size':>5} {'mode':8} {'ms':>10} {'peak':>10} {'max RSS':>10}  device"
    print(header)
    print("-" * len(header))
    rows = []
    for size in sizes:
        for mode in modes:
            for side in sides:
                r = run_one(side, size, mode, args)
                r.update(side=side, size=size, mode=mode)
                rows.append(r)
                if "error" in r:
                    print(f"{side:6} {size:>5} {mode:8} {'error':>10}  {r['error']}", flush=True)
                else:
                    print(f"{side:6} {size:>5} {mode:8} {r['ms']:>10.1f} {fmt_bytes(r['peak_bytes']):>10} "
                          f"{fmt_bytes(r['rss_bytes']):>10}  {r['device']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
