"""One process against two (mlx.launch): --parallel cfg's guidance split and --parallel tensor's DiT split.

    python benchmarks/bench_parallel.py                       # reduced DiT (8 heads x 128, 4 layers), 256x256, CPU
    python benchmarks/bench_parallel.py --size 512 --steps 5

``tensor``: the DiT is written to a temporary folder and each rank loads its share of it; per rank the weight bytes
it holds, its peak memory, ms per guided step, and one block's all-reduce (a (1, S, D) fp32 sum) alone.

Times one guided denoising step (the pipeline's Stepper: both guidance passes, the guidance, the Euler step) in
one process, then under `mlx.launch -n 2 --backend ring` with the GuidanceSplit placement, where each rank runs
one pass and they all-gather the velocity; also times that all-gather alone. Prints ms per step, the exchange's
ms and bytes, and the bytes a step exchanges at the released config.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import common


def worker(args) -> dict | None:
    common.use_checkout()
    import mlx.core as mx

    from mlx_glm_image import GlmImageTransformer2DModel, load_model
    from mlx_glm_image.pipeline.denoise import DenoiseInputs, Stepper
    from mlx_glm_image.pipeline.flow import FlowMatchEulerSampler
    from mlx_glm_image.pipeline.parallel import join
    from mlx_glm_image.scheduler import SchedulerConfig

    from mlx.utils import tree_flatten

    mx.random.seed(0)
    placement = join({"split": "cfg", "tensor": "tensor"}.get(args.worker))
    if args.worker == "tensor":
        model = load_model(GlmImageTransformer2DModel, args.folder, dtype="float32",
                                                           split=placement.splits["transformer"])
    else:
        model = GlmImageTransformer2DModel(args.inputs)
    mx.eval(model.parameters())
    if args.worker == "one":  # the folder the tensor ranks load their shares from
        common.write_component(model, args.folder, args.inputs)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    mx.reset_peak_memory()
    lat, tokens = args.size // 8, (args.size // 16) ** 2
    x = mx.random.normal((1, 16, lat, lat))
    inputs = DenoiseInputs(prompt_embeds=mx.random.normal((1, 64, 1472)),
                           negative_prompt_embeds=mx.random.normal((1, 64, 1472)),
                           prior_token_ids=mx.random.randint(0, 16384, (1, tokens)),
                           target_size=mx.array([[args.size, args.size]], mx.float32), crop_coords=mx.zeros((1, 2)),
                           guidance_scale=1.5)
    sampler = FlowMatchEulerSampler(SchedulerConfig.from_dict(common.released("scheduler")), image_seq_len=tokens,
                                    num_inference_steps=args.steps + 1)
    stepper = Stepper(model, sampler, inputs, placement=placement)
    times = []
    t0 = time.perf_counter()
    for i, _ in stepper.steps(x):  # each yield: a step evaluated (and, split, its velocities exchanged)
        if i:  # the first step is the warm-up
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    peak = mx.get_peak_memory()
    exchange, exchange_bytes = [], 0
    if placement.distributed:
        if placement.mode == "tensor":  # one block's all-reduce: the joint sequence's activations
            v, collective = mx.random.normal((1, 64 + tokens, model.config.inner_dim)), mx.distributed.all_sum
        else:  # the velocity's all-gather
            v, collective = mx.random.normal(x.shape), mx.distributed.all_gather
        mx.eval(v)
        for i in range(args.steps + 3):
            t0 = time.perf_counter()
            placement.evaluate(collective(v, group=placement.group), what="the exchange")
            if i >= 3:
                exchange.append(time.perf_counter() - t0)
        exchange_bytes = v.nbytes
    if not placement.leader:
        return None
    return {"mode": placement.mode or "one", "processes": placement.size, "step_ms": 1000 * statistics.median(times),
            "exchange_ms": 1000 * statistics.median(exchange) if exchange else None,
            "exchange_bytes": exchange_bytes, "weight_bytes": weights, "peak_bytes": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--folder", help=argparse.SUPPRESS)  # the workers' DiT folder
    common.add_worker_arguments(p, ["one", "split", "tensor"])
    args = p.parse_args()
    if args.worker:
        result = worker(args)
        if result is not None:  # rank 0 reports for the group
            common.report(result)
        return
    folder = tempfile.mkdtemp()
    argv = ["--size", args.size, "--steps", args.steps, "--folder", folder]
    cfg = common.config("transformer", "reduced")
    device = common.default_device()
    launch = [shutil.which("mlx.launch") or "mlx.launch", "-n", "2", "--backend", "ring", "--"]
    try:
        rows = [common.run_worker(__file__, "one", argv, mlx=True, device=device, inputs=cfg, timeout=args.timeout,
                                  cwd=common.ROOT, label="1 process")]
        rows += [common.run_worker(__file__, mode, argv, mlx=True, device=device, inputs=cfg, timeout=args.timeout,
                                   launcher=launch, cwd=common.ROOT, label=f"2 processes (mlx.launch, {mode})")
                 for mode in ("split", "tensor")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("| placement | processes | ms per guided step | weights per rank | peak per rank | exchange alone |")
    print("|---|---|---|---|---|---|")
    for r in filter(None, rows):
        what = {"one": "", "cfg": "all-gather of the velocity", "tensor": "one block's all-reduce"}[r["mode"]]
        extra = f"{what}: {r['exchange_ms']:.2f} ms for {r['exchange_bytes'] / 1e6:.2f} MB" if r["exchange_ms"] else ""
        print(f"| {r['mode']} | {r['processes']} | {r['step_ms']:.1f} | {r['weight_bytes'] / 1e6:.1f} MB | "
              f"{r['peak_bytes'] / 1e6:.1f} MB | {extra} |")
    dit = common.released("transformer")
    width = dit["num_attention_heads"] * dit["attention_head_dim"]
    rows_1024 = 1024 + (1024 // 16) ** 2  # the longest glyph text (max_sequence_length 2048 is the cap; 1024 here)
    reduce = 2 * rows_1024 * width * 2 + 12 * width * 2  # per block and pass: two bf16 (S, D) sums and the AdaLN's
    per_step = reduce * dit["num_layers"] * 2  # both guidance passes
    print(f"released config, tensor over 2 ranks, 1024x1024 (bf16, a 1024-token text): each rank sends and receives "
          f"{per_step / 1e9:.2f} GB a guided step (a ring all-reduce of two moves each byte once); "
          f"{per_step / 10e9:.2f} s at Thunderbolt 5's ~80 Gb/s, {per_step / 1.25e9:.2f} s at 10 GbE")
    channels = common.released("transformer")["out_channels"]
    factor = 2 ** (len(common.released("vae")["block_out_channels"]) - 1)  # pixels per latent
    per_rank = channels * (1024 // factor) ** 2 * 4  # fp32 velocity of one 1024x1024 image, sent by each rank per step
    print(f"released config: each rank sends {per_rank / 2**20:.0f} MiB a step at 1024x1024 "
          f"({4 * per_rank / 2**20:.0f} MiB at 2048x2048)")


if __name__ == "__main__":
    main()
