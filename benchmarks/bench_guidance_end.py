"""Guidance on the first steps only (``guidance_end``, --guidance-end) on the denoising loop: the whole loop's seconds
at each value against guidance on every step, in one process, at the reduced DiT config on this CPU (or the released
one on a GPU), random weights.

    python benchmarks/bench_guidance_end.py --device cpu --config reduced --size 512 --steps 20
    python benchmarks/bench_guidance_end.py --device gpu --config released --dtype bfloat16 --size 1024 --steps 50

Per value: seconds of the loop (median of --repeats, after a warm-up), the fraction of the DiT passes run (a step
past the guided ones runs the conditional pass alone) and the wall ratio against every step guided: with no
overhead outside the passes the two would be equal.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common

VALUES = (1.0, 0.75, 0.5, 0.25)


def worker(args) -> dict:
    common.use_checkout(args.src)
    import dataclasses

    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_glm_image import GlmImageTransformer2DModel
    from mlx_glm_image.pipeline.denoise import Stepper
    from mlx_glm_image.pipeline.flow import FlowMatchEulerSampler
    from mlx_glm_image.scheduler import SchedulerConfig

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    dtype = getattr(mx, args.dtype)
    dit = GlmImageTransformer2DModel(args.inputs)
    dit.update(tree_map(lambda p: p.astype(dtype), dit.parameters()))
    mx.eval(dit.parameters())
    inputs, noise, _ = common.random_denoise_inputs(dit, args.size)
    inputs = dataclasses.replace(inputs, prompt_embeds=inputs.prompt_embeds.astype(dtype),
                                 negative_prompt_embeds=inputs.negative_prompt_embeds.astype(dtype))
    n = inputs.prior_token_ids.shape[1]
    sampler = FlowMatchEulerSampler(SchedulerConfig.from_dict(common.released("scheduler")), image_seq_len=n,
                                    num_inference_steps=args.steps)

    def loop(end):
        stepper = Stepper(dit, sampler, dataclasses.replace(inputs, guidance_end=end))
        run = planned = 0
        x = noise
        for _, x in stepper.steps(noise):
            run, planned = run + stepper.passes_run, planned + len(stepper.passes)
        return x, run / planned

    def timed(end):
        loop(end)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            x, _ = loop(end)
            mx.eval(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times), max(times)

    rows = {}
    for end in args.values:
        s, lo, hi = timed(end)
        rows[str(end)] = dict(s=s, min_s=lo, max_s=hi, passes=loop(end)[1])
    return dict(device=str(mx.default_device()), rows=rows, peak_gb=mx.get_peak_memory() / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--config", choices=common.variants("transformer"), default="reduced")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--values", type=float, nargs="+", default=list(VALUES))
    p.add_argument("--src", help="the checkout whose package is timed (default: this one)")
    common.add_worker_arguments(p, ["mlx"])
    args = p.parse_args()
    if args.worker:
        common.report(worker(args))
        return
    argv = ["--device", args.device, "--dtype", args.dtype, "--size", args.size, "--steps", args.steps,
            "--repeats", args.repeats, "--values", *args.values]
    cfg = common.config("transformer", args.config)
    out = common.run_worker(__file__, "mlx", argv, mlx=True, device=args.device, src=args.src, inputs=cfg)
    if out is None:
        raise SystemExit(1)
    base = out["rows"][str(1.0)]["s"] if str(1.0) in out["rows"] else None
    print(f"\nGuidance on the first steps only, DiT {args.config} config ({cfg['num_layers']} blocks), {args.dtype}, "
          f"{args.size}x{args.size}, {args.steps} steps, guidance 1.5, {out['device']}; seconds of the whole loop, "
          f"median of {args.repeats} (min-max)")
    print("| guidance_end | s | DiT passes run | wall ratio |")
    print("|---|---|---|---|")
    for name, r in out["rows"].items():
        ratio = f"{r['s'] / base:.3f}" if base else ""
        print(f"| {name} | {r['s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | {100 * r['passes']:.0f}% | {ratio} |")
    print(f"peak {out['peak_gb']:.2f} GB")


if __name__ == "__main__":
    main()
