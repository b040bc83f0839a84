"""Classifier-free guidance on one process against two (mlx.launch, --parallel cfg's split), same machine.

    python benchmarks/bench_parallel.py                       # reduced DiT (8 heads x 128, 4 layers), 256x256, CPU
    python benchmarks/bench_parallel.py --size 512 --steps 5

Times one guided denoising step (the pipeline's Stepper: both guidance passes, the guidance, the Euler step) in
one process, then under `mlx.launch -n 2 --backend ring` with the GuidanceSplit placement, where each rank runs
one pass and they all-gather the velocity; also times that all-gather alone. Prints ms per step, the exchange's
ms and bytes, and the bytes a step exchanges at the released config.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import common


def worker(args) -> dict | None:
    common.use_checkout()
    import mlx.core as mx

    from mlx_glm_image import GlmImageTransformer2DModel
    from mlx_glm_image.pipeline.denoise import DenoiseInputs, Stepper
    from mlx_glm_image.pipeline.parallel import join
    from mlx_glm_image.scheduler import FlowMatchEulerDiscreteScheduler

    mx.random.seed(0)
    model = GlmImageTransformer2DModel(args.inputs)
    mx.eval(model.parameters())
    placement = join("cfg" if args.worker == "split" else None)
    lat, tokens = args.size // 8, (args.size // 16) ** 2
    x = mx.random.normal((1, 16, lat, lat))
    inputs = DenoiseInputs(prompt_embeds=mx.random.normal((1, 64, 1472)),
                           negative_prompt_embeds=mx.random.normal((1, 64, 1472)),
                           prior_token_ids=mx.random.randint(0, 16384, (1, tokens)),
                           target_size=mx.array([[args.size, args.size]], mx.float32), crop_coords=mx.zeros((1, 2)),
                           guidance_scale=1.5)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(args.steps + 1, image_seq_len=tokens)
    stepper = Stepper(model, scheduler, inputs, placement=placement)
    times = []
    t0 = time.perf_counter()
    for i, _ in stepper.steps(x):  # each yield: a step evaluated (and, split, its velocities exchanged)
        if i:  # the first step is the warm-up
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    exchange = []
    if placement.distributed:
        v = mx.random.normal(x.shape)
        mx.eval(v)
        for i in range(args.steps + 3):
            t0 = time.perf_counter()
            placement.evaluate(mx.distributed.all_gather(v, group=placement.group), what="the all-gather")
            if i >= 3:
                exchange.append(time.perf_counter() - t0)
    if not placement.leader:
        return None
    return {"processes": placement.size, "step_ms": 1000 * statistics.median(times),
            "exchange_ms": 1000 * statistics.median(exchange) if exchange else None, "exchange_bytes": x.size * 4}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=int, default=1800)
    common.add_worker_arguments(p, ["one", "split"])
    args = p.parse_args()
    if args.worker:
        result = worker(args)
        if result is not None:  # rank 0 reports for the group
            common.report(result)
        return
    argv = ["--size", args.size, "--steps", args.steps]
    cfg = common.config("transformer", "reduced")
    device = common.default_device()
    launch = [shutil.which("mlx.launch") or "mlx.launch", "-n", "2", "--backend", "ring", "--"]
    rows = [common.run_worker(__file__, "one", argv, mlx=True, device=device, inputs=cfg, timeout=args.timeout,
                              cwd=common.ROOT, label="1 process"),
            common.run_worker(__file__, "split", argv, mlx=True, device=device, inputs=cfg, timeout=args.timeout,
                              launcher=launch, cwd=common.ROOT, label="2 processes (mlx.launch)")]
    for r in filter(None, rows):
        extra = f", all-gather {r['exchange_ms']:.2f} ms for {r['exchange_bytes'] / 1e6:.2f} MB" if r["exchange_ms"] else ""
        print(f"{r['processes']} process(es): {r['step_ms']:.1f} ms per guided step{extra}")
    channels = common.released("transformer")["out_channels"]
    factor = 2 ** (len(common.released("vae")["block_out_channels"]) - 1)  # pixels per latent
    per_rank = channels * (1024 // factor) ** 2 * 4  # fp32 velocity of one 1024x1024 image, sent by each rank per step
    print(f"released config: each rank sends {per_rank / 2**20:.0f} MiB a step at 1024x1024 "
          f"({4 * per_rank / 2**20:.0f} MiB at 2048x2048)")


if __name__ == "__main__":
    main()
