"""The step cache (pipeline/step_cache.py) on the denoising loop: cached against uncached in the same process, at
the reduced DiT config on this CPU (or the released one on a GPU), random weights, classifier-free guidance.

    python benchmarks/bench_step_cache.py --device cpu --config reduced --size 512 --steps 20
    python benchmarks/bench_step_cache.py --device gpu --config released --dtype bfloat16 --size 1024 --steps 50

Per setting: seconds of the whole loop (median of --repeats, after a warm-up), the fraction of the passes' block
evaluations that were computed, the wall ratio cached / uncached (with no overhead it would equal that fraction),
the time the host waits for its decisions (one read per pass and step), and the PSNR of the cached final latents
against the uncached ones (random weights: what that says about real images is unknown). The uncached loop is
also timed against the forward the loop ran before the seams (``transformer(..., step_hook=...)``): the seams'
own cost.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import common

SETTINGS = {  # name -> (DBCacheConfig fields, TaylorSeer order); None: the package's --cache preset
    "sglang": None,
    "F1B0-R0.2": (dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=4, residual_diff_threshold=0.2), None),
    # random weights change more from step to step than trained ones: a loose threshold, to see the cost of skipping
    "F1B0-R0.9": (dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=4, residual_diff_threshold=0.9), None),
}
TEXT_LEN = 64


def worker(args) -> dict:
    common.use_checkout(args.src)
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_map

    from mlx_glm_image import DBCacheConfig, GlmImageTransformer2DModel, TaylorSeerCalibratorConfig
    from mlx_glm_image.pipeline.denoise import DenoiseInputs, Stepper, every_block, queued_steps
    from mlx_glm_image.pipeline.flow import FlowMatchEulerSampler
    from mlx_glm_image.pipeline.step_cache import SGLANG, StepCache
    from mlx_glm_image.scheduler import SchedulerConfig

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    dtype = getattr(mx, args.dtype)
    dit = GlmImageTransformer2DModel(args.inputs)
    dit.update(tree_map(lambda p: p.astype(dtype), dit.parameters()))
    mx.eval(dit.parameters())
    c = dit.config
    rng = np.random.default_rng(0)
    lat, n = args.size // 8, (args.size // 16) ** 2
    text = mx.array(rng.standard_normal((1, TEXT_LEN, c.text_embed_dim)).astype(np.float32)).astype(dtype)
    empty = mx.array(rng.standard_normal((1, 1, c.text_embed_dim)).astype(np.float32)).astype(dtype)
    inputs = DenoiseInputs(prompt_embeds=text, negative_prompt_embeds=empty,
                           prior_token_ids=mx.array(rng.integers(0, c.prior_vq_quantizer_codebook_size, (1, n)), mx.int32),
                           target_size=mx.array([[args.size, args.size]], mx.float32), crop_coords=mx.zeros((1, 2)),
                           guidance_scale=1.5)
    noise = mx.array(rng.standard_normal((1, c.in_channels, lat, lat)).astype(np.float32))
    sampler = FlowMatchEulerSampler(SchedulerConfig.from_dict(common.released("scheduler")), image_seq_len=n,
                                    num_inference_steps=args.steps)

    class Timed(StepCache):
        """The step cache, with the host's wait for each decision timed."""

        waited = 0.0

        def __call__(self, *a):
            work = super().__call__(*a)
            try:
                asked = next(work)
                while True:
                    yield asked
                    t0 = time.perf_counter()
                    mx.eval(asked)
                    Timed.waited += time.perf_counter() - t0
                    asked = work.send(None)
            except StopIteration as done:
                return done.value

    def loop(policy):
        stepper = Stepper(dit, sampler, inputs, blocks=policy)
        computed = total = 0
        x = noise
        for _, x in stepper.steps(noise):
            computed, total = computed + stepper.computed, total + stepper.total
        return x, computed / total

    def before_the_seams():
        """The loop as it ran before: the whole forward per pass, the step hook evaluating each block step."""
        x = noise
        shape = inputs.prior_token_ids.shape
        for i in range(sampler.num_inference_steps):
            t = mx.full((1,), sampler.model_timestep(i), dtype=mx.float32)
            vs = [dit(x.astype(dtype), e, inputs.prior_token_ids, mx.full(shape, drop), t, inputs.target_size,
                      inputs.crop_coords, step_hook=queued_steps(), return_dict=False)[0].astype(mx.float32)
                  for e, drop in ((text, False), (empty, True))]
            x = sampler.step(vs[1] + 1.5 * (vs[0] - vs[1]), i, x)
            mx.eval(x)
        return x

    def timed(fn):
        fn()  # warm-up: compiled kernels, allocator
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            mx.eval(out)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times), max(times)

    plain_x, _ = loop(every_block)
    rows = {"uncached": dict(zip(("s", "min_s", "max_s"), timed(lambda: loop(every_block)[0])), computed=1.0)}
    rows["before the seams"] = dict(zip(("s", "min_s", "max_s"), timed(before_the_seams)), computed=1.0)
    for name in args.settings:
        if SETTINGS[name] is None:
            cache, calibrator = SGLANG.cache_config, SGLANG.calibrator_config
        else:
            fields, order = SETTINGS[name]
            cache = DBCacheConfig(**fields)
            calibrator = TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
        make = lambda: Timed(cache, calibrator)  # noqa: E731
        x, fraction = loop(make())
        Timed.waited = 0.0
        row = dict(zip(("s", "min_s", "max_s"), timed(lambda: loop(make())[0])), computed=fraction)
        row["waited_s"] = Timed.waited / (args.repeats + 1)
        diff = np.array(x - plain_x)
        span = float(np.array(plain_x).max() - np.array(plain_x).min())
        row["psnr_db"] = 10 * math.log10(span**2 / max(float((diff**2).mean()), 1e-30))
        rows[name] = row
    return dict(device=str(mx.default_device()), rows=rows, peak_gb=mx.get_peak_memory() / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--config", choices=common.variants("transformer"), default="reduced")
    p.add_argument("--layers", type=int, help="blocks of the DiT (default: the config's; the released model has 30)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--src", help="the checkout whose package is timed (default: this one)")
    common.add_worker_arguments(p, ["mlx"])
    args = p.parse_args()
    if args.worker:
        common.report(worker(args))
        return
    argv = ["--device", args.device, "--dtype", args.dtype, "--size", args.size, "--steps", args.steps,
            "--repeats", args.repeats, "--settings", *args.settings]
    cfg = common.config("transformer", args.config)
    cfg["num_layers"] = args.layers or cfg["num_layers"]
    out = common.run_worker(__file__, "mlx", argv, mlx=True, device=args.device, src=args.src, inputs=cfg)
    if out is None:
        raise SystemExit(1)
    base = out["rows"]["uncached"]["s"]
    print(f"\nStep cache, DiT {args.config} config with {cfg['num_layers']} blocks, {args.dtype}, {args.size}x{args.size}, {args.steps} steps, guidance "
          f"1.5 (2 passes a step), {out['device']}; seconds of the whole loop, median of {args.repeats} (min-max)")
    print("| loop | s | computed | wall ratio | host waits for decisions | PSNR vs uncached |")
    print("|---|---|---|---|---|---|")
    for name, r in out["rows"].items():
        waited = f"{r['waited_s']:.3f} s" if "waited_s" in r else ""
        psnr = f"{r['psnr_db']:.1f} dB" if "psnr_db" in r else ""
        print(f"| {name} | {r['s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | {100 * r['computed']:.0f}% | "
              f"{r['s'] / base:.3f} | {waited} | {psnr} |")
    print(f"peak {out['peak_gb']:.2f} GB")


if __name__ == "__main__":
    main()
