"""Classifier-free guidance on one process against two (mlx.launch, --parallel cfg's split), same machine.

    python benchmarks/bench_parallel.py                       # reduced DiT (8 heads x 128, 4 layers), 256x256, CPU
    python benchmarks/bench_parallel.py --size 512 --steps 5

Times one denoising step (both guidance passes) in one process, then under `mlx.launch -n 2 --backend ring`
where each rank runs one pass and they all-gather the velocity; also times that all-gather alone. Prints ms
per step, the exchange's ms and bytes, and the bytes a step exchanges at the released config.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
REDUCED = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=128, num_attention_heads=8,
               text_embed_dim=1472, time_embed_dim=512, condition_dim=256, prior_vq_quantizer_codebook_size=16384)


def worker(args):
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    from mlx_glm_image import GlmImageTransformer2DModel
    from mlx_glm_image.pipeline.denoise import DenoiseInputs, velocity
    from mlx_glm_image.pipeline.parallel import Parallel

    mx.random.seed(0)
    model = GlmImageTransformer2DModel(REDUCED)
    mx.eval(model.parameters())
    split = Parallel.join("cfg") if args.split else None
    lat, tokens = args.size // 8, (args.size // 16) ** 2
    x = mx.random.normal((1, 16, lat, lat))
    inputs = DenoiseInputs(mx.random.normal((1, 64, 1472)), mx.random.normal((1, 64, 1472)),
                           mx.random.randint(0, 16384, (1, tokens)), mx.array([[args.size, args.size]], mx.float32),
                           mx.zeros((1, 2)), 1.5)
    t = mx.array([500.0])
    times, exchange = [], []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        mx.eval(velocity(model, x, t, inputs, None, 2, split))
        if i:
            times.append(time.perf_counter() - t0)
    if split is not None:
        v = mx.random.normal(x.shape)
        mx.eval(v)
        for i in range(args.steps + 3):
            t0 = time.perf_counter()
            mx.eval(mx.distributed.all_gather(v, group=split.group))
            if i >= 3:
                exchange.append(time.perf_counter() - t0)
    if split is None or split.leader:
        print(json.dumps({"processes": 2 if split else 1, "step_ms": 1000 * statistics.median(times),
                          "exchange_ms": 1000 * statistics.median(exchange) if exchange else None,
                          "exchange_bytes": x.size * 4}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--split", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    env = dict(os.environ)
    if Path(OPENBLAS).exists():
        env["LD_PRELOAD"] = OPENBLAS
    base = [__file__, "--worker", "--size", str(args.size), "--steps", str(args.steps)]
    rows = []
    for cmd in ([sys.executable, *base], [shutil.which("mlx.launch"), "-n", "2", "--backend", "ring", "--", sys.executable,
                                          *base, "--split"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
    for r in rows:
        extra = f", all-gather {r['exchange_ms']:.2f} ms for {r['exchange_bytes'] / 1e6:.2f} MB" if r["exchange_ms"] else ""
        print(f"{r['processes']} process(es): {r['step_ms']:.1f} ms per guided step{extra}")
    released = 16 * 128 * 128 * 4  # fp32 velocity of one 1024x1024 image, sent by each rank per step
    print(f"released config: each rank sends {released / 2**20:.0f} MiB a step at 1024x1024 ({4 * released / 2**20:.0f} MiB at 2048x2048)")


if __name__ == "__main__":
    main()
