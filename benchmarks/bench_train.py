"""One LoRA training step (forward, backward, AdamW on the adapters, batch 1): MLX (mlx_glm_image.train) against
torch + PEFT, for the AR prior model and the DiT, each side and each variant in its own process.

    python benchmarks/bench_train.py                                # reduced configs, 512x512, this CPU
    python benchmarks/bench_train.py --models dit --size 256 --iters 1 --variants plain   # quick

The reference: transformers' GlmImageForConditionalGeneration + peft's LoraConfig on the recipe's layers (q_proj
k_proj v_proj o_proj gate_up_proj down_proj), diffusers' GlmImageTransformer2DModel + add_adapter on to_q to_k to_v
to_out.0; rank 32, alpha 64, AdamW, gradients clipped to norm 1. The AR model learns the sequence of a size x size
image (a 33-token prompt, the preview and target grids, the end token), the DiT the flow-matching loss on its
latents with 64 glyph tokens. MLX variants: the base in fp32 (``plain``), the same with gradient checkpointing
(``checkpointed``: train/memory.py, the step evaluated by its ``evaluate_step``), and QLoRA (``4bit``: the frozen
base quantized by the model's own predicate before the adapters are added, checkpointed). On the CPU backend a
quantized matmul is a reference kernel, so ``4bit`` runs one step, for its memory; its time says nothing of a Mac.

Memory: MLX's peak allocation above the step's start (the weights, adapters and AdamW state) and the process's max
RSS; torch on the CPU has only the RSS (max RSS less the RSS before the first step). MLX also measures each block's
share of the peak (the step's gradient at all blocks and at half of them), from which the script ESTIMATES the
released models' memory and time for a 1024x1024 image, and which Macs they fit: the activations scaled by the
shapes (tokens, width, attention's tokens squared) from the measured figures, the time by the FLOPs.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time

import common

TEXT_LEN = 64  # the DiT's glyph tokens (as bench_transformer, bench_lora)
PROMPT_LEN = 33  # the AR prompt: 24 text tokens and the grid layout (as bench_prior)
TARGETS = {"ar": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
           "dit": ("to_q", "to_k", "to_v", "to_out.0")}
COMPONENT = {"ar": "vision_language_encoder", "dit": "transformer"}
VARIANTS = ("plain", "checkpointed", "4bit")
LR, WEIGHT_DECAY, MAX_NORM = 1e-4, 0.01, 1.0
MAC_RAM_GB = (16, 24, 32, 48, 64, 96, 128)
GPU_SHARE = 0.75  # about what macOS lets the GPU wire by default (iogpu.wired_limit_mb raises it)
ASSUMED_TFLOPS = (5, 10, 20)  # achieved bf16 matmul rates for the time estimate: assumptions, not measurements


def ar_tokens(size: int) -> int:
    """The training sequence of a size x size image: prompt, preview grid (about 16x16), target grid, end."""
    from mlx_glm_image.pipeline.processor import target_grids

    g = target_grids(size, size, text_to_image=True)
    return PROMPT_LEN + math.prod(g.preview) + math.prod(g.target) + 1


def dit_tokens(size: int) -> int:
    return (size // 16) ** 2 + TEXT_LEN


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def timed(step, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


# ---- MLX side ----------------------------------------------------------------------------------------------
def mlx_model(kind: str, cfg: dict, size: int, n: int):
    """(model, its blocks' owner and attribute, the loss function) at ``cfg``, random weights, fp32."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_map

    rng = np.random.default_rng(0)
    if kind == "ar":
        from mlx_glm_image.models.ar import GlmImageConfig, GlmImageForConditionalGeneration
        from mlx_glm_image.pipeline.processor import target_grids
        from mlx_glm_image.train.ar import IGNORE_INDEX, ArExample, ar_loss

        model = GlmImageForConditionalGeneration(GlmImageConfig.from_dict(cfg))
        model.update(tree_map(lambda p: mx.random.normal(p.shape, scale=0.02), model.parameters()))
        ids = np.concatenate([rng.integers(20000, 160000, PROMPT_LEN), rng.integers(0, 16384, n - PROMPT_LEN)])[None]
        labels = np.where(np.arange(n) < PROMPT_LEN, IGNORE_INDEX, ids)
        example = ArExample(input_ids=ids, position_ids=np.broadcast_to(np.arange(n), (3, 1, n)).copy(),
                            labels=labels, grids=target_grids(size, size, text_to_image=True))
        return model, (model.model.language_model, "layers"), lambda: ar_loss(model, example)
    from mlx_glm_image import GlmImageTransformer2DModel
    from mlx_glm_image.scheduler import SchedulerConfig
    from mlx_glm_image.train import dit as train_dit

    model = GlmImageTransformer2DModel(cfg)
    c = model.config
    n -= TEXT_LEN
    batch = train_dit.DitBatch(
        latents=mx.array(rng.standard_normal((1, c.in_channels, size // 8, size // 8)).astype(np.float32)),
        prior_token_ids=mx.array(rng.integers(0, c.prior_vq_quantizer_codebook_size, (1, n)), mx.int32),
        prompt_embeds=mx.array(rng.standard_normal((1, TEXT_LEN, c.text_embed_dim)).astype(np.float32)),
        negative_prompt_embeds=mx.array(rng.standard_normal((1, 1, c.text_embed_dim)).astype(np.float32)),
        target_size=mx.array([[size, size]], mx.float32), crop_coords=mx.zeros((1, 2)))
    sampler = train_dit.training_sampler(SchedulerConfig.from_dict(common.released("scheduler")), model, batch.latents)
    d = train_dit.draw(sampler, batch, mx.random.key(0))
    return model, (model, "transformer_blocks"), lambda: train_dit.flow_matching_loss(model, sampler, batch, d)


def worker_mlx(args) -> dict:
    common.use_checkout()
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_glm_image import lora
    from mlx_glm_image import quantize as Q
    from mlx_glm_image.train import optim as train_optim
    from mlx_glm_image.train.memory import checkpoint_blocks, evaluate_step

    mx.set_default_device(mx.cpu)
    model, (owner, attr), loss_fn = mlx_model(args.model, args.inputs["config"], args.size, args.inputs["tokens"])
    mx.eval(model.parameters())
    if args.variant == "4bit":
        Q.quantize_model(model, Q.as_spec(4))
        mx.eval(model.parameters())
    config = lora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS[args.model])
    lora.add_trainable(model, config, mx.random.key(0))
    blocks = list(getattr(owner, attr))
    if args.variant != "plain":
        checkpoint_blocks(blocks)
    optimizer = train_optim.adamw(learning_rate=LR, weight_decay=WEIGHT_DECAY, warmup_steps=0, steps=1000)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def gradient():
        loss, grads = loss_and_grad()
        evaluate_step(loss, grads, model, getattr(owner, attr))  # the training step's evaluation rule
        return grads

    def step():
        grads, _ = train_optim.clip_grad_norm(gradient(), MAX_NORM)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)

    def peak_above_start(fn) -> tuple[float, float]:
        mx.synchronize()
        mx.clear_cache()
        start = mx.get_active_memory()
        mx.reset_peak_memory()
        fn()
        return start / 1e9, (mx.get_peak_memory() - start) / 1e9

    warmup, iters = (0, 1) if args.variant == "4bit" else (args.warmup, args.iters)
    timed(step, warmup, 0)  # outside the measurement: the first step also makes AdamW's state
    optimizer.init(model.trainable_parameters())
    mx.eval(optimizer.state)
    times = []
    start, peak = peak_above_start(lambda: times.extend(timed(step, 0, iters)))
    out = dict(side="mlx", model=args.model, variant=args.variant, times=times, start_gb=start, peak_gb=peak,
               max_rss_gb=max_rss_gb(), load=os.getloadavg()[0], device=str(mx.default_device()))
    if args.variant != "4bit":  # each block's share: the gradient at all blocks and at half of them
        full = peak_above_start(gradient)[1]
        setattr(owner, attr, blocks[: len(blocks) // 2])
        half = peak_above_start(gradient)[1]
        setattr(owner, attr, blocks)
        per_block = (full - half) / (len(blocks) - len(blocks) // 2)
        out.update(per_block_gb=per_block, rest_gb=full - len(blocks) * per_block, blocks=len(blocks))
    return out


# ---- torch + PEFT side ---------------------------------------------------------------------------------------
def torch_model(kind: str, cfg: dict, size: int, n: int, rank: int):
    """(model with PEFT adapters, the loss function)."""
    import numpy as np
    import peft
    import torch

    rng = np.random.default_rng(0)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS[kind]), lora_dropout=0.0)
    if kind == "ar":
        from transformers import GlmImageConfig, GlmImageForConditionalGeneration
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers 5.x
            from transformers.modeling_utils import no_init_weights

        with no_init_weights():
            model = GlmImageForConditionalGeneration(GlmImageConfig(**common.reference_kwargs(cfg, GlmImageConfig)))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model = peft.get_peft_model(model, config).train()
        ids = torch.tensor(np.concatenate([rng.integers(20000, 160000, PROMPT_LEN),
                                           rng.integers(0, 16384, n - PROMPT_LEN)])[None])
        pos = torch.arange(n).expand(3, 1, n)
        labels = torch.where(torch.arange(n) < PROMPT_LEN, -100, ids[0])

        def loss():
            logits = model(input_ids=ids, position_ids=pos).logits
            return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[1:], ignore_index=-100)

        return model, loss
    from diffusers import GlmImageTransformer2DModel as TorchDiT

    model = TorchDiT(**common.reference_kwargs(cfg, TorchDiT))
    model.add_adapter(config)
    model.train()
    c = model.config
    n -= TEXT_LEN
    x0 = torch.from_numpy(rng.standard_normal((1, c.in_channels, size // 8, size // 8)).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
    text = rng.standard_normal((1, TEXT_LEN, c.text_embed_dim)).astype(np.float32)
    kw = dict(encoder_hidden_states=torch.from_numpy(text),
              prior_token_id=torch.from_numpy(rng.integers(0, c.prior_vq_quantizer_codebook_size, (1, n))),
              prior_token_drop=torch.zeros((1, n), dtype=torch.bool), timestep=torch.tensor([499.0]),
              target_size=torch.tensor([[size, size]], dtype=torch.float32), crop_coords=torch.zeros((1, 2)))

    def loss():
        v = model(hidden_states=0.5 * noise + 0.5 * x0, **kw, return_dict=False)[0]
        return torch.mean((v.float() - (noise - x0)) ** 2)

    return model, loss


def worker_torch(args) -> dict:
    import torch

    model, loss_fn = torch_model(args.model, args.inputs["config"], args.size, args.inputs["tokens"], args.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

    def step():
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = rss_gb()  # before the first step: AdamW's state, made by it, counts in the step's peak
    times = timed(step, args.warmup, args.iters)
    peak = max_rss_gb()
    return dict(side="torch", model=args.model, variant="peft", times=times, start_gb=start, peak_gb=peak - start,
                max_rss_gb=peak, load=os.getloadavg()[0], device="cpu", note=f"torch {torch.__version__}")


# ---- estimates at the released configs ---------------------------------------------------------------------
def block_shape(kind: str, cfg: dict) -> dict:
    """Width, feed-forward width, heads, blocks, and the blocks' linear weights per token (for FLOPs)."""
    if kind == "ar":
        t = cfg["text_config"]
        d, ff, heads, kv = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"], t["num_key_value_heads"]
        hd = d // heads
        linear = d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * ff
        return dict(d=d, ff=ff, heads=heads, layers=t["num_hidden_layers"], linear=linear,
                    head=d * t["vision_vocab_size"])
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return dict(d=d, ff=4 * d, heads=cfg["num_attention_heads"], layers=cfg["num_layers"], linear=12 * d * d, head=0)


def forward_flops(kind: str, cfg: dict, tokens: int) -> float:
    """Matmul FLOPs of one forward: the blocks' linear layers and attention's two S x S products, the vision head."""
    s = block_shape(kind, cfg)
    return 2 * tokens * (s["layers"] * s["linear"] + s["head"]) + s["layers"] * 4 * tokens * tokens * s["d"]


def activation_bytes(kind: str, cfg: dict, tokens: int, itemsize: int) -> float:
    """A block's activations as its projections' outputs and its attention scores, which MLX's attention gradient
    materialises (its fused backward is CUDA's alone in MLX 0.32): train/plan.py's count, the scores in the
    activations' dtype."""
    s = block_shape(kind, cfg)
    return itemsize * (tokens * (6 * s["d"] + 3 * s["ff"]) + s["heads"] * tokens * tokens)


def released_estimate(kind: str, measured: dict, reduced: dict, size: int, rank: int) -> dict:
    """Estimated GB and step FLOPs at the released config for a 1024x1024 image, bf16 activations, from the
    measured fp32 figures at the reduced config: a block's share scaled by ``activation_bytes``, what a checkpointed
    block keeps by tokens x width (its inputs), the rest by the tokens (the vision head's logits, in float32) or by
    tokens x width. Checkpointed: what every block keeps, the rest and one block recomputed, as if all at once."""
    import model_sizes

    from mlx_glm_image import lora
    from mlx_glm_image.convert import COMPONENTS

    released = common.released(COMPONENT[kind])
    tokens_of = ar_tokens if kind == "ar" else dit_tokens
    t_red, t_rel = tokens_of(size), tokens_of(1024)
    s_red, s_rel = block_shape(kind, reduced), block_shape(kind, released)
    block = activation_bytes(kind, released, t_rel, 2) / activation_bytes(kind, reduced, t_red, 4)
    kept = (t_rel * s_rel["d"] * 2) / (t_red * s_red["d"] * 4)
    rest = t_rel / t_red if kind == "ar" else kept
    plain, ckpt = measured["plain"], measured["checkpointed"]
    n = s_rel["layers"]
    acts = {False: plain["rest_gb"] * rest + n * plain["per_block_gb"] * block,
            True: plain["rest_gb"] * rest + plain["per_block_gb"] * block + n * ckpt["per_block_gb"] * kept}
    cls = COMPONENTS[COMPONENT[kind]]
    skeleton = cls(cls.config_class.from_dict(released))  # lazy: nothing allocated
    adapters = sum(rank * (i + o) for i, o in
                   lora.target_shapes(skeleton, lora.LoraConfig(r=rank, target_modules=TARGETS[kind])).values())
    sizes = model_sizes.sizes(COMPONENT[kind])
    weights = {"bf16": sizes["bf16"] / 1e9, "4-bit": sizes[4] / 1e9}
    trainable = adapters * 16 / 1e9  # fp32 value, gradient and AdamW's two moments
    forward = forward_flops(kind, released, t_rel)
    return dict(tokens=t_rel, adapters=adapters, weights=weights, trainable=trainable, activations=acts,
                flops={False: 2 * forward, True: 2 * forward + forward - 2 * t_rel * s_rel["head"]},
                cpu_scale=forward / forward_flops(kind, reduced, t_red))


# ---- driver ------------------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["ar", "dit"], default=["ar", "dit"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="the MLX side's")
    p.add_argument("--sides", nargs="+", choices=["mlx", "torch"], default=["mlx", "torch"])
    p.add_argument("--size", type=int, default=512, help="the image side in pixels")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed steps (the median is shown)")
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--model", choices=["ar", "dit"], help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    common.add_worker_arguments(p, ["mlx", "torch"])
    args = p.parse_args()
    if args.worker:
        common.report((worker_mlx if args.worker == "mlx" else worker_torch)(args))
        return

    common.use_checkout()
    results = {}
    for kind in args.models:
        cfg = common.config(COMPONENT[kind], "reduced")
        tokens = ar_tokens(args.size) if kind == "ar" else dit_tokens(args.size)
        runs = [("mlx", v) for v in args.variants if "mlx" in args.sides] + [("torch", None)] * ("torch" in args.sides)
        for side, variant in runs:
            argv = ["--model", kind, "--size", args.size, "--rank", args.rank, "--warmup", args.warmup,
                    "--iters", args.iters] + (["--variant", variant] if variant else [])
            out = common.run_worker(__file__, side, argv, mlx=side == "mlx", inputs=dict(config=cfg, tokens=tokens),
                                    timeout=args.timeout,
                                    label=f"{kind} {side} {variant or 'peft'}")
            if out is not None:
                results[(kind, variant or "peft")] = out
    report(args, results)


def report(args, results):
    names = {"plain": "MLX, fp32 base", "checkpointed": "MLX, fp32 base, checkpointed",
             "4bit": "MLX, 4-bit base, checkpointed", "peft": "torch + PEFT, fp32 base"}
    for kind in args.models:
        rows = {v: r for (k, v), r in results.items() if k == kind}
        if not rows:
            continue
        tokens = ar_tokens(args.size) if kind == "ar" else dit_tokens(args.size)
        what = ("AR prior model, reduced config (8 layers x 1024)" if kind == "ar" else
                "DiT, reduced config (4 blocks x 1024)")
        print(f"\n{what}: one training step, batch 1, {args.size}x{args.size} ({tokens} tokens), rank {args.rank} "
              f"on {' '.join(TARGETS[kind])}, fp32, this CPU; median of {args.iters} after {args.warmup} warm-up")
        print("| side | s per step (min-max) | start GB | peak above start GB | max RSS GB | load average |")
        print("|---|---|---|---|---|---|")
        for v in ("plain", "checkpointed", "4bit", "peft"):
            if v in rows:
                r = rows[v]
                t = statistics.median(r["times"])
                lo, hi = min(r["times"]), max(r["times"])
                spread = " (1 step; reference kernel)" if v == "4bit" else f" ({lo:.2f}-{hi:.2f})"
                print(f"| {names[v]} | {t:.2f}{spread} | {r['start_gb']:.2f} | {r['peak_gb']:.3f} | "
                      f"{r['max_rss_gb']:.2f} | {r['load']:.1f} |")
        med = {v: statistics.median(r["times"]) for v, r in rows.items()}
        if "plain" in rows and "peft" in rows:
            print(f"MLX / torch: time {med['plain'] / med['peft']:.2f}x (checkpointed "
                  f"{med.get('checkpointed', float('nan')) / med['peft']:.2f}x); max RSS "
                  f"{rows['plain']['max_rss_gb'] / rows['peft']['max_rss_gb']:.2f}x; the step's own peak "
                  f"{rows['plain']['peak_gb'] / rows['peft']['peak_gb']:.2f}x (MLX's allocations against torch's RSS)")
        if "plain" in rows and "checkpointed" in rows:
            p, c = rows["plain"], rows["checkpointed"]
            print(f"MLX checkpointed / not: peak above start {c['peak_gb'] / p['peak_gb']:.2f}x, start + peak "
                  f"{(c['start_gb'] + c['peak_gb']) / (p['start_gb'] + p['peak_gb']):.2f}x, time "
                  f"{med['checkpointed'] / med['plain']:.2f}x. Per block: {1000 * p['per_block_gb']:.1f} MB without, "
                  f"{1000 * c['per_block_gb']:.1f} MB checkpointed; the rest {1000 * p['rest_gb']:.0f} / "
                  f"{1000 * c['rest_gb']:.0f} MB")
        if "checkpointed" in rows and "4bit" in rows:
            c, q = rows["checkpointed"], rows["4bit"]
            print(f"MLX 4-bit / fp32 base (both checkpointed): start {q['start_gb'] / c['start_gb']:.2f}x, peak above "
                  f"start {q['peak_gb'] / c['peak_gb']:.2f}x, start + peak "
                  f"{(q['start_gb'] + q['peak_gb']) / (c['start_gb'] + c['peak_gb']):.2f}x")
        if "plain" in rows and "checkpointed" in rows:
            estimates(kind, args, rows, med)


def estimates(kind, args, rows, med):
    est = released_estimate(kind, rows, common.config(COMPONENT[kind], "reduced"), args.size, args.rank)
    print(f"\nESTIMATE, released {'AR prior model' if kind == 'ar' else 'DiT'}, 1024x1024 ({est['tokens']} tokens), "
          f"bf16 activations, rank {args.rank} ({est['adapters'] / 1e6:.1f} M adapter parameters, "
          f"{est['trainable']:.2f} GB with gradients and AdamW state): scaled from the figures above, not measured")
    print("| base | checkpointing | weights GB | activations GB | total GB | TFLOP per step | this CPU, scaled | "
          + " | ".join(f"at {r} TFLOP/s" for r in ASSUMED_TFLOPS) + " | " + " | ".join(f"{g} GB" for g in MAC_RAM_GB)
          + " |")
    print("|---" * (7 + len(ASSUMED_TFLOPS) + len(MAC_RAM_GB)) + "|")
    for base, weights in est["weights"].items():
        for ckpt in (False, True):
            total = weights + est["trainable"] + est["activations"][ckpt]
            flops = est["flops"][ckpt]
            cpu = med["checkpointed" if ckpt else "plain"] * est["cpu_scale"]
            fits = ["fits" if total <= GPU_SHARE * g else "raised limit" if total <= g else "no" for g in MAC_RAM_GB]
            print(f"| {base} | {'on' if ckpt else 'off'} | {weights:.1f} | {est['activations'][ckpt]:.1f} | "
                  f"{total:.1f} | {flops / 1e12:.0f} | {cpu / 60:.0f} min | "
                  + " | ".join(f"{flops / r / 1e12:.1f} s" for r in ASSUMED_TFLOPS) + " | " + " | ".join(fits) + " |")
    print(f"A Mac: 'fits' within {GPU_SHARE:.0%} of its memory (about what macOS lets the GPU use by default), "
          "'raised limit' within all of it (sysctl iogpu.wired_limit_mb, nothing else running). The time columns "
          "assume an achieved bf16 matmul rate; 'this CPU, scaled' is the measured fp32 step times the FLOP ratio.")


if __name__ == "__main__":
    main()
