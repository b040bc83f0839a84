"""Generate (or edit) an image with GLM-Image in MLX.

    python -m mlx_glm_image.generate --prompt 'A poster that says "Hello MLX"' --output hello.png
    python -m mlx_glm_image.generate --model glm-image-4bit --prompt "..." --image photo.jpg   # editing

Text in quotes ('...', "...", \u201c...\u201d, \u300c...\u300d) is what GLM-Image renders as glyphs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from .cli import Parser, fail

DESCRIPTION = __doc__
# What a run reads besides tokenizer/ (optional: ByT5 needs no vocabulary file).
COMPONENTS = ("transformer", "vae", "text_encoder", "scheduler", "vision_language_encoder", "processor")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m mlx_glm_image.generate", description=DESCRIPTION,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="what to draw; quote the text that must appear in the image")
    p.add_argument("--model", default="zai-org/GLM-Image",
                   help="pipeline folder (diffusers layout or converted by convert.py) or Hugging Face repo id (default: %(default)s)")
    p.add_argument("--output", default="glm-image.png", help="PNG path; with several images, _1, _2... are added (default: %(default)s)")
    p.add_argument("--image", action="append", metavar="PATH", help="condition image for editing (repeat for several)")
    size = ("pixels, a multiple of 32, at most the model's largest side (the released model: 512 to 2048, at most "
            "2^22 pixels in all; default: 1024, or the condition image's)")
    p.add_argument("--height", type=int, help=size)
    p.add_argument("--width", type=int, help=size)
    p.add_argument("--steps", type=int, default=50, help="denoising steps, 1 to 1000 (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=1.5,
                   help="classifier-free guidance scale, >= 0; 1 or less turns it off (default: %(default)s)")
    p.add_argument("--seed", type=int, help="random seed for the AR sampling and the noise, 0 to 2^64 - 1 (default: random, printed)")
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt (default: %(default)s)")
    gen = "(default: the checkpoint's generation_config.json, else GLM-Image's published 0.9 / 0.75 / off)"
    p.add_argument("--temperature", type=float, help=f"AR sampling temperature, > 0 {gen}")
    p.add_argument("--top-p", type=float, help=f"AR nucleus sampling, in (0, 1] {gen}")
    p.add_argument("--top-k", type=int, help=f"AR top-k sampling, >= 0, 0 for off {gen}")
    p.add_argument("--quantize", type=int, choices=[4, 8],
                   help="quantize the DiT and the AR model at load time (a converted folder is used as it is)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="compute dtype (default: %(default)s)")
    p.add_argument("--memory", choices=["auto", "resident", "staged"], default="auto",
                   help="staged: load each model for its stage and free it after (peak = the largest stage); "
                        "resident: keep every model loaded; auto: resident when the weights fit (default: %(default)s)")
    p.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto",
                   help="decode in overlapping tiles to bound memory (auto: above 1024x1024 pixels)")
    p.add_argument("--no-metadata", action="store_true", help="do not write the prompt and settings into the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage report")
    return p


def png_metadata(args, seed: int):
    from PIL.PngImagePlugin import PngInfo

    from . import __version__

    info = PngInfo()
    info.add_text("prompt", args.prompt)
    settings = f"model={args.model}, size={args.width}x{args.height}, steps={args.steps}, guidance={args.guidance}, seed={seed}"
    if args.quantize:
        settings += f", quantize={args.quantize}"
    if args.image:
        settings += f", images={','.join(Path(p).name for p in args.image)}"
    info.add_text("parameters", settings)
    info.add_text("Software", f"mlx-glm-image {__version__}")
    return info


def save_png(image, path: Path, pnginfo=None):
    """Write next to the target and rename, so that an interrupted run never leaves half a file; the file's
    mode follows the umask (a temporary file is created 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=pnginfo)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output).expanduser()
    if path.suffix.lower() != ".png":
        raise ValueError(f"--output must end in .png, got {output}")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i + 1}{path.suffix}") for i in range(n)]


def check_output(paths: list[Path], height: int, width: int):
    """Each PNG can be written: not a folder, its folder exists or can be made and is writable, room on disk."""
    for path in paths:
        if path.is_dir():
            raise ValueError(f"--output {path} is a folder")
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise ValueError(f"--output {path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"--output {path}: no permission to write there")
    need = len(paths) * (3 * height * width + (1 << 20))  # an uncompressed RGB image each, at most
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(f"--output: {folder} has {free >> 20} MB free; {len(paths)} image(s) of {width}x{height} "
                         f"need up to {need >> 20} MB")


def check_arguments(args) -> tuple[list[Path], list | None]:
    """Everything the user gave, before any model is loaded: (output paths, condition images)."""
    from .pipeline.checks import check_prompt, check_sampling, check_seed
    from .pipeline.image_processor import load_image

    check_prompt(args.prompt)
    check_sampling(args.steps, args.guidance, args.temperature, args.top_p, args.top_k)
    check_seed(args.seed)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    paths = output_paths(args.output, args.num_images)
    return paths, [load_image(p) for p in args.image] if args.image else None


def run(args) -> list[Path]:
    import mlx.core as mx

    from .pipeline import GlmImagePipeline

    paths, images = check_arguments(args)
    pipe = GlmImagePipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize, memory=args.memory,
                                            verbose=not args.quiet,
                                            vae_tiling={"auto": None, "on": True, "off": False}[args.vae_tiling])
    missing = pipe.missing_components(COMPONENTS)  # configs were read, no weights
    if missing:
        raise ValueError(f"{args.model} lacks {', '.join(m + '/' for m in missing)}")
    images = pipe.prepare_condition_images([images]) if images else None
    args.height, args.width = pipe.image_size(images, args.height, args.width)
    check_output(paths, args.height, args.width)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    if not args.quiet:
        print(f"seed {seed}", flush=True)
    out = pipe(
        prompt=args.prompt, image=images, height=args.height, width=args.width, num_inference_steps=args.steps,
        guidance_scale=args.guidance, num_images_per_prompt=args.num_images, generator=seed, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, progress=not args.quiet,
    )
    info = None if args.no_metadata else png_metadata(args, seed)
    for image, path in zip(out.images, paths):
        save_png(image, path, info)
    if not args.quiet:
        total = sum(out.timings.values())
        peak = max(out.peak_memory.values(), default=0)
        print(f"saved {', '.join(map(str, paths))} in {total:.1f} s, peak memory {peak / 1e9:.2f} GB "
              f"(MLX {mx.__version__}, {mx.default_device()})")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .loading import WeightsError

    try:
        run(args)
    except (ValueError, WeightsError, RuntimeError, OSError) as e:  # OSError: disk full, permissions
        return fail(e)
    except KeyboardInterrupt:
        print("interrupted; no image written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
