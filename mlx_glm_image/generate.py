"""Generate (or edit) an image with GLM-Image in MLX.

    python -m mlx_glm_image.generate --prompt 'A poster that says "Hello MLX"' --output hello.png
    python -m mlx_glm_image.generate --model glm-image-4bit --prompt "..." --image photo.jpg   # editing

Text in quotes ('...', "...", \u201c...\u201d, \u300c...\u300d) is what GLM-Image renders as glyphs.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

DESCRIPTION = __doc__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_glm_image.generate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="what to draw; quote the text that must appear in the image")
    p.add_argument("--model", default="zai-org/GLM-Image",
                   help="pipeline folder (diffusers layout or converted by convert.py) or Hugging Face repo id (default: %(default)s)")
    p.add_argument("--output", default="glm-image.png", help="PNG path; with several images, _1, _2... are added (default: %(default)s)")
    p.add_argument("--image", action="append", metavar="PATH", help="condition image for editing (repeat for several)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 32 (default: 1024, or the condition image's)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 32 (default: 1024, or the condition image's)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale; 1 turns it off (default: %(default)s)")
    p.add_argument("--seed", type=int, help="random seed for the AR sampling and the noise (default: random, printed)")
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, help="AR sampling temperature (default: the checkpoint's generation config)")
    p.add_argument("--top-p", type=float, help="AR nucleus sampling (default: the checkpoint's generation config)")
    p.add_argument("--top-k", type=int, help="AR top-k sampling (default: the checkpoint's generation config)")
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
    """Write next to the target and rename, so that an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=pnginfo)
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


def load_images(paths: list[str] | None):
    if not paths:
        return None
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except FileNotFoundError:
            raise ValueError(f"condition image {p} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read condition image {p}: {e}") from None
    return images


def run(args) -> list[Path]:
    import mlx.core as mx

    from .pipeline import GlmImagePipeline

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    paths = output_paths(args.output, args.num_images)
    images = load_images(args.image)
    for name, value in (("--steps", args.steps), ("--num-images", args.num_images)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1")
    pipe = GlmImagePipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize, memory=args.memory,
                                            verbose=not args.quiet,
                                            vae_tiling={"auto": None, "on": True, "off": False}[args.vae_tiling])
    if not args.quiet:
        print(f"seed {seed}", flush=True)
    out = pipe(
        prompt=args.prompt, image=images, height=args.height, width=args.width, num_inference_steps=args.steps,
        guidance_scale=args.guidance, num_images_per_prompt=args.num_images, seed=seed, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, progress=not args.quiet,
    )
    args.height, args.width = out.images[0].height, out.images[0].width
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
    except (ValueError, WeightsError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no image written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
