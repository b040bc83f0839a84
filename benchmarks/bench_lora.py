"""What an active LoRA adapter costs a denoising step (lora.py): the DiT without an adapter, with a rank-r adapter on
every linear layer of its blocks (attention q/k/v/out, feed-forward in/out) as a separate low-rank path, and with
it folded in (fuse_lora), in one process; and the FLOPs the path adds at the released config.

    python benchmarks/bench_lora.py --device cpu --config reduced --size 512 --rank 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import common

TEXT_LEN = 64
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")


def lora_flops(cfg: dict, size: int, rank: int) -> float:
    """The low-rank path of one forward: 2 * tokens * r * (in + out) per adapted layer."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    s = (size // 16) ** 2 + TEXT_LEN
    per_block = 4 * 2 * s * rank * (d + d) + 2 * 2 * s * rank * (d + 4 * d)
    return cfg["num_layers"] * per_block


def worker(args) -> dict:
    common.use_checkout(args.src)
    import mlx.core as mx
    import numpy as np

    from mlx_glm_image import GlmImageTransformer2DModel, lora
    from mlx_glm_image.pipeline.denoise import Stepper

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    dit = GlmImageTransformer2DModel(args.inputs)
    mx.eval(dit.parameters())
    c = dit.config
    inputs, x, sampler = common.random_denoise_inputs(dit, args.size, TEXT_LEN)
    rng = np.random.default_rng(1)  # the adapters' weights
    modules = dict(dit.named_modules())
    layers = {}
    for b in range(c.num_layers):
        for t in TARGETS:
            out_dims, in_dims = modules[f"transformer_blocks.{b}.{t}"].weight.shape
            layers[f"transformer_blocks.{b}.{t}"] = (
                mx.array(rng.standard_normal((args.rank, in_dims)).astype(np.float32) / in_dims**0.5),
                mx.array(rng.standard_normal((out_dims, args.rank)).astype(np.float32) * 0.01), 2.0)
    adapter = lora.LoraAdapter(name="bench", source="random", sha256="", layers=layers)

    def step():
        v = Stepper(dit, sampler, inputs).guided_velocity(10, x, sampler.model_timestep(10))
        mx.eval(v)

    def timed():
        step()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times), max(times)

    rows = {"no adapter": timed()}
    lora.apply(dit, [(adapter, 1.0)])
    rows[f"rank-{args.rank} adapter, separate path"] = timed()
    lora.fuse(dit)
    rows["the same, fused"] = timed()
    lora.remove(dit)
    rows["no adapter, after unloading"] = timed()
    return dict(device=str(mx.default_device()), rows=rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--config", choices=common.variants("transformer"), default="reduced")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--src", help="the checkout whose package is timed (default: this one)")
    common.add_worker_arguments(p, ["mlx"])
    args = p.parse_args()
    if args.worker:
        common.report(worker(args))
        return
    cfg = common.config("transformer", args.config)
    out = common.run_worker(__file__, "mlx", ["--device", args.device, "--size", args.size, "--rank", args.rank,
                                              "--repeats", args.repeats], mlx=True, device=args.device, src=args.src,
                            inputs=cfg)
    if out is None:
        raise SystemExit(1)
    base = out["rows"]["no adapter"][0]
    print(f"\nOne guided DiT step (2 passes), {args.config} config ({cfg['num_layers']} blocks), fp32, {args.size}x{args.size}, "
          f"{out['device']}; median of {args.repeats} (min-max)")
    print("| DiT | ms | vs no adapter |")
    print("|---|---|---|")
    for name, (t, lo, hi) in out["rows"].items():
        print(f"| {name} | {1000 * t:.0f} ({1000 * lo:.0f}-{1000 * hi:.0f}) | {t / base:.3f} |")
    released = common.config("transformer")
    from bench_preview import dit_flops

    for side in (1024, 2048):
        extra, forward = lora_flops(released, side, args.rank), dit_flops(released, side)
        print(f"\nReleased config, {side}x{side}: the rank-{args.rank} path adds {extra / 1e12:.2f} TFLOP to a "
              f"{forward / 1e12:.1f} TFLOP forward ({extra / forward:.2%})")


if __name__ == "__main__":
    main()
