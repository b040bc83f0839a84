"""One whole text-to-image generation (prompt -> AR prior tokens -> glyph encoder -> DiT steps -> VAE decode):
MLX's GlmImagePipeline against diffusers' GlmImagePipeline, each side in its own process, same machine.

    # CUDA machine: the released config, random bf16 weights built on the GPU, 1024x1024, 50 steps, guidance 1.5
    python benchmarks/bench_pipeline.py --config released --device gpu --bits 0 4
    python benchmarks/bench_pipeline.py --config released --device gpu --sides mlx --memory staged   # 16-32 GB Macs
    # this CPU: the same run at a reduced width (fp32, 512x512, 8 steps)
    python benchmarks/bench_pipeline.py --config reduced --device cpu
    # the tiny test checkpoint, loaded from disk; --src times other checkouts of this package (before/after)
    python benchmarks/bench_pipeline.py --config tiny --sides mlx --src . /path/to/other/checkout

Prints seconds and peak memory per stage: build (random weights made on the device; for "tiny" and for MLX's
staged memory, writing and first loading the folder), then the pipeline's stages: prior (the AR model generating
its whole grid), glyphs (the ByT5 glyph encoder), denoise (the DiT steps), decode (the VAE). Each side first runs
a warm-up generation (2 steps, at most 512x512) so that kernel compilation and allocator growth are not timed.
Peak memory: MLX's allocator high-water mark per stage; torch's max_memory_allocated per stage on CUDA, the
process's max RSS on the CPU. Both sides sample the AR grid with temperature 0.9 and top_p 0.75, and both
complete the grid (no end token before its last token), so they do the same work.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = common.ROOT
STAGES = ["prior", "glyphs", "denoise", "decode"]  # the pipeline's stage names (its .timings / .peak_memory keys)
OLD_STAGES = {"glyph encoder": "glyphs", "denoising": "denoise", "vae decode": "decode"}  # older checkouts' (--src)
COMPONENT_NAMES = ("transformer", "vae", "text_encoder", "vision_language_encoder")
PROMPT = 'A vintage poster with the title "GLM-Image" in bold red letters above a lighthouse at dusk'
IMAGE_START, IMAGE_END = 16384, 16385
SPECIALS = {"<pad>": 167841, "[gMASK]": 167842, "<|user|>": 167843, "<|assistant|>": 167844, "<sop>": 167845,
            "<eop>": 167846, "<|image|>": 167855}
TEMPLATE = ("[gMASK]{% for message in messages %}<|{{ message.role }}|>{% for item in message.content %}"
            "{% if item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# "reduced": every stage a few seconds on a laptop CPU (changes to the released configs)
REDUCED = {"vision_language_encoder": common.SMALLER[("vision_language_encoder", "reduced")],
           "transformer": dict(num_layers=2, num_attention_heads=4), "text_encoder": dict(num_layers=2),
           "vae": dict(block_out_channels=[32, 64, 128, 128], layers_per_block=2)}


def configs(name: str) -> dict:
    """Model configs per component (config.json dicts; diffusers / transformers keyword names): the released ones
    (common.released), reduced for "reduced"."""
    cfg = {c: common.released(c) for c in COMPONENT_NAMES}
    if name == "reduced":
        cfg = {c: common.merged(cfg[c], REDUCED[c]) for c in COMPONENT_NAMES}
    # random AR weights may sample any vision token (a trained model samples codes only): let the DiT take them all
    cfg["transformer"]["prior_vq_quantizer_codebook_size"] = cfg["vision_language_encoder"]["text_config"][
        "vision_vocab_size"]
    return cfg


def write_skeleton(folder: Path, cfg: dict) -> Path:
    """The files that are not weights: model_index.json, scheduler/, tokenizer/ (ByT5), and processor/ with a
    tokenizer laid out like the released one (the vision tokens at 0..16511, the specials at their ids)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import ByT5Tokenizer, PreTrainedTokenizerFast
    from transformers.models.glm_image.processing_glm_image import GlmImageProcessor

    try:  # no torchvision needed; older transformers have only the torchvision one
        from transformers.models.glm_image.image_processing_pil_glm_image import (
            GlmImageImageProcessorPil as ImageProcessor)
    except ImportError:
        from transformers.models.glm_image.image_processing_glm_image import GlmImageImageProcessor as ImageProcessor

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True, time_shift_type="linear",
                                    base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                    max_image_seq_len=4096).save_pretrained(folder / "scheduler")
    ByT5Tokenizer().save_pretrained(folder / "tokenizer")
    n_vision = cfg["vision_language_encoder"]["text_config"]["vision_vocab_size"]
    vocab = {f"<|dit_token_{i}|>": i for i in range(n_vision)}
    words = ["<unk>"] + [str(i) for i in range(200)] + PROMPT.replace('"', " ").split()
    vocab.update({w: 20000 + i for i, w in enumerate(dict.fromkeys(words))})
    vocab.update(SPECIALS)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS]
                           + [AddedToken(f"<|dit_token_{i}|>", special=True, normalized=False)
                              for i in (IMAGE_START, IMAGE_END)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token=f"<|dit_token_{IMAGE_END}|>",
        bos_token=f"<|dit_token_{IMAGE_START}|>", eos_token=f"<|dit_token_{IMAGE_END}|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"})
    image_processor = ImageProcessor(patch_size=16, temporal_patch_size=1, merge_size=1)
    GlmImageProcessor(image_processor=image_processor, tokenizer=fast, chat_template=TEMPLATE).save_pretrained(
        folder / "processor")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    return folder


def ar_tokens(height: int, width: int) -> int:
    """New tokens of a text-to-image prompt: the preview grid, the target grid, the end token."""
    import math

    ratio = height / width
    return int(math.sqrt(ratio) * 16) * int(math.sqrt(1 / ratio) * 16) + (height // 32) * (width // 32) + 1


def warmup_size(kw: dict) -> dict:
    """The warm-up's arguments: a short AR grid (at most 512x512) still reaches every kernel."""
    return dict(kw, height=min(kw["height"], 512), width=min(kw["width"], 512))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- MLX side ----------------------------------------------------------------------------------------------------
def mlx_pipeline(args):
    """The pipeline and the seconds it took to make. Resident: random models built in memory and handed over.
    Staged: the pipeline frees only the models it loaded itself, so the random weights are written to the
    folder first (each model alone in memory) and loaded from there, stage by stage, as a user's folder is."""
    import mlx.core as mx

    from mlx_glm_image.pipeline import GlmImagePipeline

    t0 = time.perf_counter()
    if args.config == "tiny" or args.memory == "staged":
        if args.config != "tiny":
            for name in COMPONENT_NAMES:
                write_random_component(args, name)
        pipe = GlmImagePipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.bits or None,
                                                memory=args.memory)
        return pipe, time.perf_counter() - t0
    models = {name: random_component(args, name) for name in COMPONENT_NAMES}
    mx.synchronize()
    pipe = GlmImagePipeline(source=args.model, dtype=args.dtype, memory="resident", **models)
    return pipe, time.perf_counter() - t0


def random_component(args, name: str, quantize: bool = True):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_glm_image import quantize as Q
    from mlx_glm_image.convert import COMPONENTS

    cls = COMPONENTS[name]
    model = cls(cls.config_class.from_dict(args.inputs[name]))
    # the glyph encoder keeps its checkpoint's float32, as the pipeline loads it
    model.set_dtype(mx.float32 if name == "text_encoder" else getattr(mx, args.dtype))
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)  # one tensor at a time: the peak stays at the weights
    if quantize and args.bits and cls.quantize_by_default:
        Q.quantize_model(model, Q.as_spec(args.bits))
    model.after_load()
    return model


def write_random_component(args, name: str):
    common.write_component(random_component(args, name, quantize=False), args.model / name, args.inputs[name])


def run_mlx(args) -> dict:
    import mlx.core as mx

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    pipe, build = mlx_pipeline(args)
    kw = dict(prompt=PROMPT, height=args.height, width=args.width, guidance_scale=1.5, seed=0, output_type="np",
              temperature=0.9, top_p=0.75, top_k=0)
    if args.warmup:
        pipe(num_inference_steps=2, **warmup_size(kw))
    loaded = pipe.load_seconds
    t0 = time.perf_counter()
    out = pipe(num_inference_steps=args.steps, **kw)
    total = time.perf_counter() - t0
    import mlx_glm_image

    src = Path(mlx_glm_image.__file__).parents[1]
    note = " ".join(x for x in (f"{args.bits}-bit" if args.bits else "", args.memory,
                                "" if src == ROOT else str(src)) if x)
    timings = {OLD_STAGES.get(k, k): v for k, v in out.timings.items()}
    peaks = {OLD_STAGES.get(k, k): v for k, v in out.peak_memory.items()}
    return dict(side="mlx", note=note, device=str(mx.default_device()), build_s=build + loaded,
                load_s=pipe.load_seconds - loaded, total_s=total, stages={k: timings.get(k, 0.0) for k in STAGES},
                peaks={k: peaks.get(k, 0) for k in STAGES}, peak=max(peaks.values()), max_rss=peak_rss())


# ---- diffusers side ----------------------------------------------------------------------------------------------
class TorchStages:
    """Times (and on CUDA, peak memory of) the stages of diffusers' pipeline by wrapping the methods that start
    them; denoise is what lies between the glyph encoder and the VAE decode."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        self.stages, self.peaks, self.mark = {}, {}, None

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def close(self, name):
        self.sync()
        now = time.perf_counter()
        self.stages[name] = now - self.mark
        self.peaks[name] = self.torch.cuda.max_memory_allocated() if self.cuda else 0
        self.mark = now
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def wrap(self, name, fn, before=None):
        def timed(*a, **k):
            if before is not None:
                self.close(before)
            else:
                self.sync()
                self.mark = time.perf_counter()
                if self.cuda:
                    self.torch.cuda.reset_peak_memory_stats()
            out = fn(*a, **k)
            self.close(name)
            return out

        return timed


def torch_pipeline(args, torch, device):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import (ByT5Tokenizer, GlmImageConfig, GlmImageForConditionalGeneration, GlmImageProcessor,
                              T5Config, T5EncoderModel)

    dtype = getattr(torch, args.dtype)
    if args.config == "tiny":
        t0 = time.perf_counter()
        pipe = GlmImagePipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        return pipe, time.perf_counter() - t0
    cfg = {name: common.reference_kwargs(args.inputs[name], ref) for name, ref in (
        ("transformer", GlmImageTransformer2DModel), ("vae", AutoencoderKL), ("text_encoder", T5Config),
        ("vision_language_encoder", GlmImageConfig))}
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:  # made on the device: no slow CPU initialisation, no copy
        transformer = GlmImageTransformer2DModel(**cfg["transformer"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = T5EncoderModel(T5Config(**cfg["text_encoder"], dropout_rate=0.0))
        ar = GlmImageForConditionalGeneration(GlmImageConfig(**cfg["vision_language_encoder"]))
    torch.set_default_dtype(prev)
    pipe = GlmImagePipeline(
        tokenizer=ByT5Tokenizer.from_pretrained(args.model / "tokenizer"),
        processor=GlmImageProcessor.from_pretrained(args.model / "processor"), text_encoder=text_encoder.eval(),
        vision_language_encoder=ar.eval(), vae=vae.eval(), transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(args.model / "scheduler"))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return pipe, time.perf_counter() - t0


def run_torch(args) -> dict:
    import torch

    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    pipe, build = torch_pipeline(args, torch, device)
    # the same sampling as the MLX side, and a complete grid (no end token before its last token)
    n = ar_tokens(args.height, args.width)
    text = pipe.vision_language_encoder.config.text_config
    pipe.vision_language_encoder.generation_config.update(
        temperature=0.9, top_p=0.75, top_k=0, min_new_tokens=n - 1, forced_eos_token_id=text.eos_token_id,
        eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    timer = TorchStages(torch, device)
    pipe.generate_prior_tokens = timer.wrap("prior", pipe.generate_prior_tokens)
    pipe.encode_prompt = timer.wrap("glyphs", pipe.encode_prompt, before="between")
    pipe.vae.decode = timer.wrap("decode", pipe.vae.decode, before="denoise")
    kw = dict(prompt=PROMPT, height=args.height, width=args.width, guidance_scale=1.5, output_type="np",
              generator=torch.Generator(device).manual_seed(0))
    with torch.inference_mode():
        if args.warmup:
            pipe(num_inference_steps=2, **warmup_size(kw))
        timer.stages.clear()
        t0 = time.perf_counter()
        pipe(num_inference_steps=args.steps, **kw)
        timer.sync()
        total = time.perf_counter() - t0
    timer.stages["prior"] += timer.stages.pop("between", 0.0)  # diffusers' bookkeeping after the AR stage
    peaks = {k: timer.peaks.get(k, 0) for k in STAGES}
    import diffusers

    return dict(side="diffusers", note=f"diffusers {diffusers.__version__}, torch {torch.__version__}",
                device=str(device), build_s=build, load_s=0.0, total_s=total,
                stages={k: timer.stages.get(k, 0.0) for k in STAGES}, peaks=peaks, peak=max(peaks.values()),
                max_rss=peak_rss())


# ---- driver ------------------------------------------------------------------------------------------------------
def print_table(results, args):
    print(f"\nWhole generation, {args.config} config, {args.dtype}, {args.height}x{args.width}, {args.steps} steps, "
          f"guidance 1.5, {ar_tokens(args.height, args.width)} AR tokens; seconds (peak GB)")
    head = ["side", "device", "build s"] + STAGES + ["of which loading", "total s", "peak GB", "max RSS GB", "note"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for r in results:
        stages = [f"{r['stages'][k]:.2f} ({r['peaks'][k] / 1e9:.2f})" if r["peaks"][k] else f"{r['stages'][k]:.2f}"
                  for k in STAGES]
        peak = f"{r['peak'] / 1e9:.2f}" if r["peak"] else "-"
        print(f"| {r['side']} | {r['device']} | {r['build_s']:.1f} | " + " | ".join(stages)
              + f" | {r['load_s']:.2f} | {r['total_s']:.2f} | {peak} | {r['max_rss'] / 1e9:.2f} | {r['note']} |")
    ref = [r for r in results if r["side"] == "diffusers"]
    for r in results:
        if r["side"] == "mlx" and ref:
            mem = f", peak {r['peak'] / ref[0]['peak']:.2f}x" if ref[0]["peak"] else ""
            print(f"MLX ({r['note'] or 'this checkout'}) / diffusers: time {r['total_s'] / ref[0]['total_s']:.2f}x{mem}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "reduced", "released"], default="reduced")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--sides", default="mlx,diffusers")
    p.add_argument("--src", type=Path, nargs="+", default=[ROOT], help="checkouts of this package to time, in turn")
    p.add_argument("--bits", type=int, nargs="+", default=[0], help="MLX runs: 0 (unquantized), 4, 8")
    p.add_argument("--memory", nargs="+", choices=["resident", "staged"], default=["resident"],
                   help="MLX runs: every model kept (built in memory), or each loaded for its stage and freed "
                        "after it (random weights written to disk first)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--dtype", help="default: float32 on the CPU, bfloat16 on the GPU")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    common.add_worker_arguments(p, ["mlx", "diffusers"])
    args = p.parse_args()
    size = {"tiny": (64, 96), "reduced": (512, 512), "released": (1024, 1024)}[args.config]
    args.height, args.width = args.height or size[0], args.width or size[1]
    args.steps = args.steps or {"tiny": 10, "reduced": 8, "released": 50}[args.config]
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.worker:
        common.use_checkout(args.src[0])
        args.bits, args.memory = args.bits[0], args.memory[0]
        common.report((run_mlx if args.worker == "mlx" else run_torch)(args))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = None  # "tiny": the models' configs are the folder's
        if args.config == "tiny":
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_checkpoints import write_pipeline

            args.model = write_pipeline(Path(tmp) / "tiny-glm-image")
        else:  # this checkout's configs, handed to every worker: the same models whichever checkout --src times
            cfg = configs(args.config)
            args.model = write_skeleton(Path(tmp), cfg)
        runs = [("mlx", src, bits, memory) for src in args.src for bits in args.bits for memory in args.memory]
        runs = (runs if "mlx" in args.sides else []) + ([("diffusers", ROOT, 0, "resident")]
                                                         if "diffusers" in args.sides else [])
        for side, src, bits, memory in runs:
            argv = ["--model", args.model, "--config", args.config, "--device", args.device, "--height", args.height,
                    "--width", args.width, "--steps", args.steps, "--dtype", args.dtype, "--bits", bits,
                    "--memory", memory] + ([] if args.warmup else ["--no-warmup"])
            label = side if side != "mlx" else f"mlx {f'{bits}-bit ' if bits else ''}{memory} {src}"
            res = common.run_worker(__file__, side, argv, mlx=side == "mlx", device=args.device, src=src, inputs=cfg,
                                    timeout=args.timeout, cwd=tempfile.gettempdir(), label=label)
            if res is not None:
                results.append(res)
    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
