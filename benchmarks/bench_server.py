"""The server's throughput and per-request overhead against direct pipeline calls, same settings, same machine.

    python benchmarks/bench_server.py            # a tiny random checkpoint written to a temp folder
    python benchmarks/bench_server.py --model glm-image-4bit --size 1024x1024 --steps 50 --requests 5

Each side runs in its own process: the server (`python -m mlx_glm_image.server`, driven by the official openai
client over 127.0.0.1) and a plain `GlmImagePipeline` call loop. Prints requests/s and ms per request for both,
and the difference (HTTP, JSON, PNG + base64 encoding, queueing).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = common.ROOT


def direct(args) -> dict:
    common.use_checkout()
    from mlx_glm_image import GlmImagePipeline

    w, h = map(int, args.size.split("x"))
    pipe = GlmImagePipeline.from_pretrained(args.model, dtype=args.dtype, memory="resident")
    call = dict(prompt="a red cat", height=h, width=w, num_inference_steps=args.steps, top_k=1)
    pipe(**call, generator=0)  # warm-up: loads the models
    times = []
    for i in range(args.requests):
        t0 = time.perf_counter()
        pipe(**call, generator=i).images[0]
        times.append(time.perf_counter() - t0)
    return {"side": "direct", "ms": 1000 * statistics.median(times), "rps": len(times) / sum(times)}


def served(args) -> dict:
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_glm_image.server", "-m", str(args.model), "--port", str(port),
                             "--dtype", args.dtype, "--memory", "resident"], cwd=ROOT,
                            env=common.worker_env(mlx=True, device=common.default_device()),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
        extra = {"num_inference_steps": args.steps, "top_k": 1}
        client.images.generate(prompt="a red cat", size=args.size, extra_body={**extra, "seed": 0})  # warm-up
        times = []
        for i in range(args.requests):
            t0 = time.perf_counter()
            client.images.generate(prompt="a red cat", size=args.size, extra_body={**extra, "seed": i})
            times.append(time.perf_counter() - t0)
        return {"side": "server", "ms": 1000 * statistics.median(times), "rps": len(times) / sum(times)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="pipeline folder (default: a tiny random one)")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--dtype", default="float32")
    common.add_worker_arguments(p, ["direct", "server"])
    args = p.parse_args()
    if args.worker:
        common.report(direct(args) if args.worker == "direct" else served(args))
        return
    device = common.default_device()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_checkpoints import write_pipeline

            args.model = write_pipeline(Path(tmp) / "tiny-glm-image")
        argv = ["--model", args.model, "--size", args.size, "--steps", args.steps, "--requests", args.requests,
                "--dtype", args.dtype]
        # no torch in these processes: the pipeline's (direct) and the server's get OpenBLAS on the CPU, the client not
        rows = [common.run_worker(__file__, side, argv, mlx=side == "direct", device=device, cwd=ROOT)
                for side in ("direct", "server")]
        rows = [r for r in rows if r is not None]
        for r in rows:
            print(f"{r['side']:>7}: {r['ms']:8.1f} ms per request, {r['rps']:6.2f} requests/s")
        if len(rows) == 2:
            print(f"overhead of the server: {rows[1]['ms'] - rows[0]['ms']:.1f} ms per request "
                  f"({args.size}, {args.steps} steps, {args.requests} sequential requests)")


if __name__ == "__main__":
    main()
