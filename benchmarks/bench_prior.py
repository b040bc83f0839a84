"""Decode speed and peak memory of the AR prior model: MLX (mlx_glm_image.models.ar) against transformers.

Each side runs in its own subprocess (random weights, the same prompt layout: a short text prompt followed by the
1024x1024 grid suffix, so positions follow the real preview + target grids), sampling with temperature 0.9 and
top_p 0.75 as the reference README. By default the whole 1024x1024 grid is generated (1281 tokens). Decode
rate = (N - 1) / (t(N tokens) - t(1 token)), prefill excluded.

    python benchmarks/bench_prior.py --config reduced --device cpu
    python benchmarks/bench_prior.py --config narrow --device cpu --sides mlx --profile   # per-token overhead
    python benchmarks/bench_prior.py --config released --device gpu --bits 4   # CUDA machine, bf16 and 4-bit
    python benchmarks/bench_prior.py --sides mlx --src . /path/to/other/checkout   # before/after a change

``--profile`` also times one decode step of the MLX side, compiled (as generation runs it) and eager: the host
time to issue it and its primitives (on the CPU backend, RMSNorm and attention are several primitives each).

On the CPU the MLX side preloads a system OpenBLAS when present (the mlx wheel's reference BLAS is ~100x slower);
the torch side never gets it. Also printed: the memory-bandwidth bound of a 1024x1024 prompt (1281 tokens) on
Apple GPUs, from the released text model's weight bytes.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import common

ROOT = common.ROOT
CONFIGS = common.variants("vision_language_encoder")  # common.SMALLER: "reduced", "narrow"

GRIDS = [[1, 32, 32], [1, 16, 16]]  # 1024x1024: target 32x32, preview 16x16 -> 1281 new tokens
SAMPLING = dict(temperature=0.9, top_p=0.75, top_k=50)
MAC_BANDWIDTH = {"M4 (120 GB/s)": 120, "M4 Pro (273 GB/s)": 273, "M1-M3 Max (400 GB/s)": 400,
                 "M4 Max (546 GB/s)": 546, "M2/M3 Ultra (800 GB/s)": 800}


def prompt_ids(cfg: dict, n_text: int = 24):
    import numpy as np

    rng = np.random.default_rng(0)
    text = rng.integers(20000, 160000, n_text).tolist()
    grid_bos, grid_eos = 167845, 167846
    digits = rng.integers(20000, 160000, 4).tolist()  # stand-ins for "32 32" / "16 16" (positions ignore them)
    ids = text + [grid_bos, digits[0], digits[1], grid_eos, grid_bos, digits[2], digits[3], grid_eos,
                  cfg["image_start_token_id"]]
    return np.array([ids], dtype=np.int64)


def read_per_token(name: str) -> bool:
    """Whether a decode step reads all of this parameter: the text model and lm_head do; the vision side and
    VQ are not used, and the token table gives one row."""
    return not ("visual" in name or "vqmodel" in name or "embed_tokens" in name)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- MLX side ------------------------------------------------------------------------------------------------
def run_mlx(args) -> dict:
    common.use_checkout(args.src[0])
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_map_with_path

    from mlx_glm_image.models.ar import GlmImageConfig, GlmImageForConditionalGeneration
    from mlx_glm_image.pipeline.prior_tokens import drain, generate_step
    from mlx_glm_image.pipeline.sample_utils import make_sampler

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    cfg = args.inputs  # the parent's config: the same for every checkout --src times
    dtype = getattr(mx, args.dtype)
    t0 = time.perf_counter()
    model = GlmImageForConditionalGeneration(GlmImageConfig.from_dict(cfg))

    # replace the (lazy, never evaluated) default init by random weights made directly in the target dtype
    def init(path, p):
        if path.endswith("norm.weight") or "layernorm" in path or path.endswith(("norm1.weight", "norm2.weight")):
            return mx.ones(p.shape, dtype)
        if path.endswith("bias"):
            return mx.zeros(p.shape, dtype)
        return mx.random.normal(p.shape, dtype=dtype, scale=0.02)

    model.update(tree_map_with_path(init, model.parameters()))
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)  # one tensor at a time keeps the peak at the weights
    if args.bits:  # as the pipeline quantizes it: the model's own predicate
        from mlx_glm_image import quantize as Q

        Q.quantize_model(model, Q.as_spec(args.bits))
        mx.eval(model.parameters())
    build_s = time.perf_counter() - t0
    weight_gb = sum(p.nbytes for _, p in tree_flatten(model.parameters())) / 1e9
    read_gb = sum(p.nbytes for k, p in tree_flatten(model.parameters()) if read_per_token(k)) / 1e9

    ids = prompt_ids(cfg)
    grids = np.array(GRIDS)
    inputs = dict(input_ids=ids, image_grid_thw=grids, images_per_sample=np.array([2]))

    def generate(max_new_tokens):
        return drain(generate_step(model, inputs, max_new_tokens=max_new_tokens, sampler=make_sampler(**SAMPLING), key=0))

    generate(2)  # warm-up
    mx.reset_peak_memory()
    t = time.perf_counter()
    generate(1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    out = generate(args.tokens)
    tn = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    import mlx_glm_image

    src = Path(mlx_glm_image.__file__).parents[1]
    note = " ".join(x for x in (f"{args.bits}-bit" if args.bits else "", "" if src == ROOT else str(src)) if x)
    res = dict(side="mlx", device=str(mx.default_device()), build_s=build_s, weights_gb=weight_gb, read_gb=read_gb,
               prefill_s=t1, tokens=n, decode_tok_s=(n - 1) / max(tn - t1, 1e-9), total_s=tn,
               peak_gb=mx.get_peak_memory() / 1e9, max_rss_gb=peak_rss_gb(), note=note)
    if args.profile:
        res["profile"] = {mode: profile_step(model, ids, grids, compiled=mode == "compiled")
                          for mode in ("compiled", "eager")}
    return res


def profile_step(model, ids, grids, compiled: bool, steps: int = 40) -> dict:
    """Host ms to issue one decode step (median), device + host ms per step, and the step's primitives."""
    import collections
    import re
    import tempfile

    import mlx.core as mx
    import numpy as np

    from mlx_glm_image.models.ar.positions import decode_positions
    from mlx_glm_image.pipeline.prior_grid import whole_grid
    from mlx_glm_image.pipeline.prior_tokens import Decoding
    from mlx_glm_image.pipeline.sample_utils import make_sampler

    B, L = ids.shape
    n = 1281
    pos, table = model.get_rope_index(ids, grids, np.array([2]))
    V = model.config.text_config.vision_vocab_size
    run = Decoding(prompt_length=L, positions=mx.array(decode_positions(table, 0, n, B, L)), attention_mask=None,
                   max_new_tokens=n, sampler=make_sampler(**SAMPLING), logits_processors=whole_grid(n, [V - 1], V))
    cache = model.make_cache(L + n, window=L)
    tok, _ = run.prefill(model, mx.array(ids), mx.array(pos), cache, mx.random.key(0))
    state, key = [c.state for c in cache], mx.random.key(1)
    del cache
    (mx.enable_compile if compiled else mx.disable_compile)()
    step = run.step(model)
    issue, total = [], []
    for i in range(steps):
        mx.eval(tok, key, state)
        t0 = time.perf_counter()
        tok, _, key, state = step(tok, mx.array(i, dtype=mx.int32), key, state, run.window(i))
        t1 = time.perf_counter()
        mx.eval(tok, key, state)
        issue.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, step(tok, mx.array(steps, dtype=mx.int32), key, state, run.window(steps))[0])
        kinds = collections.Counter(re.findall(r'label ="([^"]+)"', Path(f.name).read_text()))
    mx.enable_compile()
    return dict(issue_ms=1000 * sorted(issue)[steps // 2], step_ms=1000 * sorted(total)[steps // 2],
                primitives=sum(kinds.values()), top=kinds.most_common(8))


# ---- transformers side ---------------------------------------------------------------------------------------
def run_torch(args) -> dict:
    import torch
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x
        from transformers.modeling_utils import no_init_weights

    dev = torch.device("cuda" if args.device == "gpu" else "cpu")
    dtype = getattr(torch, args.dtype)
    cfg = args.inputs
    torch.manual_seed(0)
    t0 = time.perf_counter()
    config = GlmImageConfig(**common.reference_kwargs(cfg, GlmImageConfig))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with no_init_weights(), dev:
        model = GlmImageForConditionalGeneration(config)
    torch.set_default_dtype(prev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0, 0.02)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    build_s = time.perf_counter() - t0
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    read_gb = sum(p.numel() * p.element_size() for k, p in model.named_parameters() if read_per_token(k)) / 1e9

    ids = torch.tensor(prompt_ids(cfg), device=dev)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=torch.tensor(GRIDS, device=dev),
                  images_per_sample=torch.tensor([2], device=dev))

    def gen(n):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=True, **SAMPLING)
        sync()
        return out

    gen(2)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    gen(1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    out = gen(args.tokens)
    tn = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    peak = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else float("nan")
    return dict(side="transformers", device=str(dev), build_s=build_s, weights_gb=weight_gb, read_gb=read_gb,
                prefill_s=t1, tokens=n,
                decode_tok_s=(n - 1) / max(tn - t1, 1e-9), total_s=tn, peak_gb=peak, max_rss_gb=peak_rss_gb(),
                note=f"torch {torch.__version__}")


# ---- driver --------------------------------------------------------------------------------------------------
def bandwidth_table():
    """Weight bytes read per decoded token of the released text model (all layers + lm_head) / bandwidth."""
    common.use_checkout()
    from mlx_glm_image.models.ar.config import GlmImageConfig

    c = GlmImageConfig.from_dict(common.released("vision_language_encoder")).text_config
    d, kv, f = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size
    per_layer = d * d + 2 * d * kv + (d + 2 * kv) + d * d + d * 2 * f + f * d + 4 * d
    params = c.num_hidden_layers * per_layer + d * c.vision_vocab_size  # embedding rows read: negligible
    n_tok = 1281
    rows = []
    for name, bits in (("bf16", 16), ("8-bit (g64)", 8 + 32 / 64), ("4-bit (g64)", 4 + 32 / 64)):
        gb = params * bits / 8 / 1e9
        rows.append((name, gb, {k: bw / gb for k, bw in MAC_BANDWIDTH.items()}))
    print(f"\nBandwidth bound, released text model ({params / 1e9:.2f} B params read per token), "
          f"1024x1024 prompt = {n_tok} tokens:")
    print("| weights | GB/token | " + " | ".join(MAC_BANDWIDTH) + " |")
    print("|---|---|" + "---|" * len(MAC_BANDWIDTH))
    for name, gb, r in rows:
        cells = " | ".join(f"{v:.0f} tok/s, {n_tok / v:.0f} s" for v in r.values())
        print(f"| {name} | {gb:.2f} | {cells} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIGS, default="reduced")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--tokens", type=int, default=1281, help="new tokens (default: the whole 1024x1024 grid)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: float32 on cpu, bfloat16 on gpu")
    ap.add_argument("--bits", type=int, default=0, help="quantize the MLX model (4 or 8), as the pipeline does")
    ap.add_argument("--bandwidth", type=float, help="the device's memory bandwidth in GB/s: adds the bound's share")
    ap.add_argument("--sides", default="mlx,transformers")
    ap.add_argument("--src", type=Path, nargs="+", default=[ROOT], help="checkouts of this package to time, in turn")
    ap.add_argument("--profile", action="store_true", help="also profile one MLX decode step")
    ap.add_argument("--no-openblas", action="store_true")
    ap.add_argument("--timeout", type=int, default=3000)
    common.add_worker_arguments(ap, ["mlx", "transformers"])
    args = ap.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    if args.worker:
        common.report((run_mlx if args.worker == "mlx" else run_torch)(args))
        return

    cfg = common.config("vision_language_encoder", args.config)
    results = []
    runs = [(side, src) for side in args.sides.split(",") for src in (args.src if side == "mlx" else [ROOT])]
    for side, src in runs:
        argv = ["--config", args.config, "--device", args.device, "--tokens", args.tokens, "--dtype", args.dtype,
                "--bits", args.bits] + (["--profile"] if args.profile else [])
        res = common.run_worker(__file__, side, argv, mlx=side == "mlx", device=args.device, src=src, inputs=cfg,
                                timeout=args.timeout, openblas=not args.no_openblas)
        if res is not None:
            results.append(res)

    print(f"\nAR prior decode, {args.config} config, {args.dtype}, prompt + {args.tokens} new tokens "
          f"(1024x1024 grid layout, temperature 0.9, top_p 0.75):")
    bound = f" (of {args.bandwidth:.0f} GB/s)" if args.bandwidth else ""
    print("| side | device | weights GB | GB read per token | build s | prefill s | decode tok/s | share of the "
          f"bandwidth bound{bound} | peak alloc GB | max RSS GB | note |")
    print("|---" * 11 + "|")
    for r in results:
        share = f"{r['decode_tok_s'] * r['read_gb'] / args.bandwidth:.0%}" if args.bandwidth else "-"
        print(f"| {r['side']} | {r['device']} | {r['weights_gb']:.2f} | {r['read_gb']:.2f} | {r['build_s']:.1f} | "
              f"{r['prefill_s']:.3f} | {r['decode_tok_s']:.2f} | {share} | {r['peak_gb']:.2f} | {r['max_rss_gb']:.2f} | "
              f"{r['note']} |")
    torch_rate = [r["decode_tok_s"] for r in results if r["side"] == "transformers"]
    for r in results:
        if r["side"] == "mlx" and torch_rate:
            print(f"\nMLX ({r['note'] or 'this checkout'}) / transformers decode speed: "
                  f"{r['decode_tok_s'] / torch_rate[0]:.2f}x")
        for mode, prof in r.get("profile", {}).items():
            print(f"\none decode step, {mode} ({r['note'] or 'this checkout'}): issued in {prof['issue_ms']:.2f} ms "
                  f"(host), {prof['step_ms']:.2f} ms issued and run; {prof['primitives']} primitives, most: "
                  + ", ".join(f"{k} {v}" for k, v in prof["top"]))
    bandwidth_table()


if __name__ == "__main__":
    main()
