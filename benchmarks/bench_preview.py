"""What a live preview costs (pipeline/preview.py) against a denoising step: measured at the reduced pipeline config
of bench_pipeline.py, and counted in FLOPs at the released config.

    python benchmarks/bench_preview.py --device cpu --size 512

A preview is the predicted clean latents, average-pooled by a power of 2 (to at most 256 pixels a side), decoded
by the VAE and turned into a PIL image; a step is one guided DiT step (two passes) and its Euler update. FLOPs count
the matmuls and convolutions (2 per multiply-add): the DiT forward from its linear layers and attention, the VAE
decoder from its convolutions at each resolution.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common

TEXT_LEN = 64


def dit_flops(cfg: dict, size: int) -> float:
    """One DiT forward at ``size`` x ``size``: per block QKV, output and the 4x feed-forward on every token, and
    attention's two S x S products."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    s = (size // 16) ** 2 + TEXT_LEN
    per_block = 2 * s * (4 * d * d + 2 * 4 * d * d) + 4 * s * s * d
    return cfg["num_layers"] * per_block


def decoder_flops(cfg: dict, latent_side: int) -> float:
    """The VAE decoder on a ``latent_side`` x ``latent_side`` latent: conv_in, the mid block's resnets, each up
    block's resnets (layers_per_block + 1) and upsampler, conv_out; 3x3 convolutions (1x1 shortcuts where the
    width changes)."""
    def conv(cin, cout, side, k=3):
        return 2 * cin * cout * k * k * side * side

    widths = list(reversed(cfg["block_out_channels"]))
    side, c = latent_side, widths[0]
    flops = conv(cfg["latent_channels"], c, side)
    flops += 2 * 2 * conv(c, c, side)  # mid block: two resnets of two convolutions (no attention in the release)
    for i, out in enumerate(widths):
        for j in range(cfg["layers_per_block"] + 1):
            cin = c if j == 0 else out
            flops += conv(cin, out, side) + conv(out, out, side) + (conv(cin, out, side, 1) if cin != out else 0)
        c = out
        if i < len(widths) - 1:
            side *= 2
            flops += conv(c, c, side)
    return flops + conv(c, 3, side)


def worker(args) -> dict:
    common.use_checkout(args.src)
    import mlx.core as mx

    from mlx_glm_image import AutoencoderKL, GlmImageTransformer2DModel
    from mlx_glm_image.pipeline.denoise import Stepper
    from mlx_glm_image.pipeline.image_processor import VaeImageProcessor
    from mlx_glm_image.pipeline.preview import pooled, pooling
    from mlx_glm_image.pipeline.stages import decode_latents

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    cfg = args.inputs
    dit, vae = GlmImageTransformer2DModel(cfg["transformer"]), AutoencoderKL(cfg["vae"])
    mx.eval(dit.parameters(), vae.parameters())
    inputs, x, sampler = common.random_denoise_inputs(dit, args.size, TEXT_LEN)
    lat = x.shape[-1]
    stepper = Stepper(dit, sampler, inputs)
    factor = pooling(args.size, args.size, lat, lat)

    def step():
        v = stepper.guided_velocity(10, x, sampler.model_timestep(10))
        mx.eval(sampler.step(v, 10, x), v)
        return v

    v = step()

    def preview():
        small = pooled(sampler.x0(x, v, 10), factor)
        return VaeImageProcessor(vae.scale_factor).postprocess(decode_latents(vae, small), "pil")

    def timed(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times), max(times)

    return dict(device=str(mx.default_device()), step=timed(step), preview=timed(preview), factor=factor,
                preview_size=preview()[0].size)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--src", help="the checkout whose package is timed (default: this one)")
    common.add_worker_arguments(p, ["mlx"])
    args = p.parse_args()
    if args.worker:
        common.report(worker(args))
        return
    from bench_pipeline import configs

    out = common.run_worker(__file__, "mlx", ["--device", args.device, "--size", args.size, "--repeats", args.repeats],
                            mlx=True, device=args.device, src=args.src, inputs=configs("reduced"))
    if out is None:
        raise SystemExit(1)
    (step, *step_range), (prev, *prev_range) = out["step"], out["preview"]
    print(f"\nA preview against a guided step, reduced pipeline config (bench_pipeline.py), fp32, {args.size}x{args.size}, "
          f"{out['device']}; median of {args.repeats} (min-max)")
    print("| | ms | |")
    print("|---|---|---|")
    print(f"| one guided DiT step (2 passes) | {1000 * step:.0f} ({1000 * step_range[0]:.0f}-{1000 * step_range[1]:.0f}) | |")
    print(f"| one preview ({out['factor']}x pooled, {out['preview_size'][0]}x{out['preview_size'][1]}) | "
          f"{1000 * prev:.0f} ({1000 * prev_range[0]:.0f}-{1000 * prev_range[1]:.0f}) | {prev / step:.2f} of a step |")
    dit, vae = common.config("transformer"), common.config("vae")
    for side, factor in ((1024, 4), (2048, 8)):
        f = 2 * dit_flops(dit, side)
        print(f"\nReleased config, {side}x{side}: a guided step {f / 1e12:.1f} TFLOP; a preview ({factor}x pooled, 256x256) "
              f"{decoder_flops(vae, side // 8 // factor) / 1e12:.2f} TFLOP ({decoder_flops(vae, side // 8 // factor) / f:.2%} "
              f"of a step); the final decode {decoder_flops(vae, side // 8) / 1e12:.1f} TFLOP")


if __name__ == "__main__":
    main()
