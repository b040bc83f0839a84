"""One whole generation (prompt -> AR prior tokens -> glyph encoder -> DiT steps -> VAE decode), MLX only.

    # a tiny random checkpoint written here (needs torch + diffusers + transformers, as the tests do)
    python benchmarks/bench_pipeline.py --device cpu
    # the same run against another checkout of this package (before/after a change), in its own process
    python benchmarks/bench_pipeline.py --device cpu --src /path/to/other/checkout

Each run is its own process. Prints the first call (from_pretrained included) and the following calls (median)
in ms, and the highest of the stages' peak memory (MLX's allocator high-water mark) over all calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def worker(args):
    sys.path.insert(0, str(args.src))
    import mlx.core as mx

    from mlx_glm_image.pipeline import GlmImagePipeline

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    kw = dict(prompt='a red cat "big"', height=args.height, width=args.width, num_inference_steps=args.steps,
              seed=3, top_k=1)
    t0 = time.perf_counter()
    pipe = GlmImagePipeline.from_pretrained(args.model, dtype=args.dtype)
    out = pipe(**kw)
    first = (time.perf_counter() - t0) * 1000
    first_image = out.images[0]
    times, peaks = [], [max(out.peak_memory.values())]
    for _ in range(args.iters):
        t0 = time.perf_counter()
        out = pipe(**kw)
        times.append((time.perf_counter() - t0) * 1000)
        peaks.append(max(out.peak_memory.values()))
    import mlx_glm_image

    print(json.dumps(dict(src=str(Path(mlx_glm_image.__file__).parents[1]), first_ms=first, median_ms=statistics.median(times),
                          peak_mb=max(peaks) / 1e6, size=list(first_image.size))), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--model", type=Path, help="pipeline folder (default: a tiny random one written to a temp folder)")
    p.add_argument("--src", type=Path, nargs="+", default=[ROOT], help="checkouts of this package to time, in turn")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.src = args.src[0]
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_checkpoints import write_pipeline

            args.model = write_pipeline(Path(tmp) / "tiny-glm-image")
        env = dict(os.environ)
        if args.device == "cpu" and Path(OPENBLAS).exists():
            env["LD_PRELOAD"] = OPENBLAS
        for src in args.src:
            cmd = [sys.executable, __file__, "--worker", "--src", str(src), "--model", str(args.model), "--device",
                   args.device, "--height", str(args.height), "--width", str(args.width), "--steps", str(args.steps),
                   "--iters", str(args.iters), "--dtype", args.dtype]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    print(line)


if __name__ == "__main__":
    main()
