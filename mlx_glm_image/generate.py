"""Generate (or edit) images with GLM-Image in MLX.

    PROG --prompt 'A poster that says "Hello MLX"' --output hello.png
    PROG -m glm-image-4bit --prompt "..." --image photo.jpg                  # editing
    PROG --prompt "..." --seed 1 2 3 --output 'shot_{seed}.png' --metadata     # one image per seed
    PROG --prompt-file prompts.txt --auto-seeds 2 --output 'run/{index}_{prompt}.png'
    PROG --config-from-metadata shot_2.png --steps 30                        # again, with one change

Text in quotes ('...', "...", \u201c...\u201d, \u300c...\u300d) is what GLM-Image renders as glyphs. Each image has
its own seed, used for both the AR sampling and the noise, so any image regenerates alone from its metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .cli import Parser, fail, prog_name
from .quantize import BITS

# What a run reads besides tokenizer/ (optional: ByT5 needs no vocabulary file).
COMPONENTS = ("transformer", "vae", "text_encoder", "scheduler", "vision_language_encoder", "processor")
DEFAULTS = dict(model="zai-org/GLM-Image", output="glm-image.png", steps=50, guidance=1.5, num_images=1,
                dtype="bfloat16", memory="auto", vae_tiling="auto")


def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None, so a run knows what the user gave (it overrides --config-from-metadata);
    DEFAULTS fills the rest."""
    prog = prog_name("python -m mlx_glm_image.generate")
    p = Parser(prog=prog, description=__doc__.replace("PROG", prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to draw")
    what.add_argument("--prompt", help="what to draw; quote the text that must appear in the image")
    what.add_argument("--prompt-file", metavar="PATH",
                      help="one prompt per line (.txt), or one JSON object per line (.jsonl): \"prompt\" and per-image "
                           "\"seed\", \"size\" (WxH), \"steps\", \"guidance\", \"image\"")
    what.add_argument("--image", action="append", metavar="PATH", help="condition image for editing (repeat for several)")
    size = ("pixels, a multiple of 32, at most the model's largest side (the released model: 512 to 2048, at most "
            "2^22 pixels in all; default: 1024, or the condition image's)")
    what.add_argument("--height", type=int, help=size)
    what.add_argument("--width", type=int, help=size)
    what.add_argument("--steps", type=int, help=f"denoising steps, 1 to 1000 (default: {DEFAULTS['steps']})")
    what.add_argument("--guidance", type=float,
                      help=f"classifier-free guidance scale, >= 0; 1 or less turns it off (default: {DEFAULTS['guidance']})")
    gen = "(default: the checkpoint's generation_config.json, else GLM-Image's published 0.9 / 0.75 / off)"
    what.add_argument("--temperature", type=float, help=f"AR sampling temperature, > 0 {gen}")
    what.add_argument("--top-p", type=float, help=f"AR nucleus sampling, in (0, 1] {gen}")
    what.add_argument("--top-k", type=int, help=f"AR top-k sampling, >= 0, 0 for off {gen}")
    seeds = p.add_argument_group("how many")
    seeds.add_argument("--seed", type=int, nargs="+", metavar="S",
                       help="one image per seed, each 0 to 2^64 - 1 (default: a random one, printed)")
    seeds.add_argument("--auto-seeds", type=int, metavar="N", help="N images with random seeds")
    seeds.add_argument("--num-images", type=int, metavar="N", help="N images with consecutive seeds from --seed (default: 1)")
    seeds.add_argument("--config-from-metadata", metavar="PATH",
                       help="start from the settings recorded in a PNG or JSON written by this tool; flags given override them")
    out = p.add_argument_group("output")
    out.add_argument("--output", help="PNG path; may hold {seed}, {index} (0-based over the run) and {prompt} (a short "
                                      "slug); without them several images get _1, _2... (default: glm-image.png)")
    out.add_argument("--overwrite", action="store_true", default=None,
                     help="replace existing files (by default a numeric suffix is added, and printed)")
    out.add_argument("--metadata", action="store_true", default=None, help="also write each image's settings as JSON beside it")
    out.add_argument("--no-metadata", action="store_true", default=None, help="do not write the settings into the PNG")
    out.add_argument("--print-config", action="store_true", default=None,
                     help="print each image's resolved settings and path, and stop (no model is loaded)")
    out.add_argument("--quiet", action="store_true", default=None, help="no progress bars or stage report")
    model = p.add_argument_group("model")
    model.add_argument("-m", "--model", help="pipeline folder (diffusers layout or converted by convert.py) or Hugging "
                                             f"Face repo id (default: {DEFAULTS['model']})")
    model.add_argument("-q", "--quantize", type=int, choices=BITS,
                       help="quantize the DiT and the AR model at load time (a converted folder is used as it is)")
    model.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="compute dtype (default: bfloat16)")
    model.add_argument("--memory", choices=["auto", "resident", "staged"],
                       help="staged: load each model for its stage and free it after (peak = the largest stage); "
                            "resident: keep every model loaded; auto: resident when the weights fit (default: auto)")
    model.add_argument("--vae-tiling", choices=["auto", "on", "off"],
                       help="decode in overlapping tiles to bound memory (default: auto, above 1024x1024 pixels)")
    par = p.add_argument_group("several processes or Macs (under mlx.launch)")
    par.add_argument("--parallel", choices=["cfg", "data"],
                     help="cfg: 2 processes, one runs the conditional and one the unconditional DiT passes of every "
                          "step; data: the run's images divided over the processes")
    par.add_argument("--parallel-timeout", type=float,
                     help="seconds a process waits for the others before it stops with an error (default: 600)")
    return p


def plan(args) -> tuple[dict, list[dict]]:
    """(the run's settings, one settings dict per image): recorded metadata, then the flags given, then defaults."""
    from . import runs

    given = {k: v for k, v in vars(args).items() if v is not None}
    recorded = runs.read_metadata(args.config_from_metadata) if args.config_from_metadata else {}
    run = {**DEFAULTS, **{k: recorded[k] for k in runs.RUN_KEYS if k in recorded}, **given}
    run.setdefault("quantize", None)
    image = {k: recorded.get(k) for k in runs.IMAGE_KEYS if k not in ("prompt", "seed")}
    image.update(steps=image["steps"] or DEFAULTS["steps"], guidance=DEFAULTS["guidance"] if image["guidance"] is None else image["guidance"])
    image.update({k: given[k] for k in ("height", "width", "steps", "guidance", "temperature", "top_p", "top_k", "image") if k in given})
    if args.prompt_file:
        entries = runs.read_prompt_file(args.prompt_file)
    elif args.prompt is not None or "prompt" in recorded:
        entries = [{"prompt": args.prompt if args.prompt is not None else recorded["prompt"]}]
    else:
        raise ValueError("give --prompt, --prompt-file or --config-from-metadata")
    if args.seed or args.auto_seeds is not None or args.num_images is not None or "seed" not in recorded:
        seeds = runs.seeds_for(args.seed, args.auto_seeds, run["num_images"])
    else:
        seeds = [recorded["seed"]]
    return run, runs.plan_images(entries, seeds, image)


def check_output(paths: list[Path], sizes: list[tuple[int, int]]):
    """Each PNG can be written: its folder exists or can be made and is writable (runs.output_paths refuses a
    path that is a folder), and the disk has room."""
    for path in paths:
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise ValueError(f"--output {path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"--output {path}: no permission to write there")
    need = sum(3 * h * w + (1 << 20) for h, w in sizes)  # an uncompressed RGB image each, at most
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(f"--output: {folder} has {free >> 20} MB free; {len(paths)} image(s) need up to {need >> 20} MB")


def prepare(pipe, run: dict, images: list[dict]) -> tuple[list[dict], list]:
    """Check every image's settings and resolve them (size, sampling) before any weight is read; returns the
    pipeline requests and the (path, moved-from) outputs."""
    from . import runs
    from .pipeline.checks import check_prompt, check_sampling, check_seed
    from .pipeline.image_processor import load_image

    outputs = runs.output_paths(run["output"], images, bool(run.get("overwrite")))
    missing = pipe.missing_components(COMPONENTS)  # configs were read, no weights
    if missing:
        raise ValueError(f"{run['model']} lacks {', '.join(m + '/' for m in missing)}")
    loaded, requests = {}, []
    for image in images:
        check_prompt(image["prompt"])
        check_sampling(image["steps"], image["guidance"], image["temperature"], image["top_p"], image["top_k"])
        check_seed(image["seed"])
        for path in image["image"] or []:
            loaded.setdefault(path, load_image(path))
        condition = pipe.prepare_condition_images([[loaded[p] for p in image["image"]]]) if image["image"] else None
        image["height"], image["width"] = pipe.image_size(condition, image["height"], image["width"])
        image.update(pipe.sampling_settings(image["temperature"], image["top_p"], image["top_k"]))
        requests.append(dict(prompt=image["prompt"], image=condition, height=image["height"], width=image["width"],
                             num_inference_steps=image["steps"], guidance_scale=image["guidance"], generator=image["seed"],
                             temperature=image["temperature"], top_p=image["top_p"], top_k=image["top_k"]))
    check_output([p for p, _ in outputs], [(i["height"], i["width"]) for i in images])
    return requests, outputs


def run(args) -> list[Path]:
    from . import runs
    from .pipeline import GlmImagePipeline

    settings, images = plan(args)
    pipe = GlmImagePipeline.from_pretrained(settings["model"], dtype=settings["dtype"], quantize=settings["quantize"],
                                            memory=settings["memory"], verbose=not settings.get("quiet"),
                                            vae_tiling={"auto": None, "on": True, "off": False}[settings["vae_tiling"]],
                                            parallel=settings.get("parallel"))
    if pipe.parallel is not None:
        join_the_others(pipe, settings, images, random_seeds=args.seed is None)
    requests, outputs = prepare(pipe, settings, images)
    if pipe.parallel is not None:
        pipe.parallel.barrier()  # every process has planned its output paths before any is written
    loaded = dict(quantization=pipe.quantization(), revision=pipe.revision())
    records = [runs.metadata(image, settings, loaded) for image in images]
    if settings.get("print_config"):
        for (path, _), record in zip(outputs, records):
            print(json.dumps({"output": str(path), **record}, ensure_ascii=False))
        return []
    for path, asked in outputs:
        if asked is not None:
            print(f"{asked} exists: writing {path}", file=sys.stderr)
    try:
        results, report = pipe.generate_batch(requests, progress=not settings.get("quiet"))
    except RuntimeError as e:
        raise RuntimeError(f"rank {pipe.parallel.rank}: {e}" if pipe.parallel is not None else str(e)) from None
    writes = pipe.parallel is None or pipe.parallel.mode == "data" or pipe.parallel.leader
    for (path, _), result, record in zip(outputs, results, records):
        if result is not None and writes:
            write_image(result.images[0], path, record, png_text=not settings.get("no_metadata"), sidecar=settings.get("metadata"))
    if pipe.parallel is not None:
        pipe.parallel.barrier()
    if not settings.get("quiet"):
        print_report(outputs, records, report)
    return [p for p, _ in outputs]


def join_the_others(pipe, settings: dict, images: list[dict], random_seeds: bool):
    """Under mlx.launch: rank 0 reports, random seeds are rank 0's, and a stopped peer stops this process too."""
    import mlx.core as mx

    group = pipe.parallel
    group.timeout = settings.get("parallel_timeout") or group.timeout
    settings["quiet"] = settings.get("quiet") or not group.leader
    pipe.verbose = not settings["quiet"]
    stop_with_the_others(group)
    if random_seeds:
        seeds = group.broadcast(mx.array([i["seed"] for i in images], dtype=mx.int64)).tolist()
        for image, seed in zip(images, seeds):
            image["seed"] = seed


def print_report(outputs, records, report):
    import mlx.core as mx

    for i, ((path, _), record) in enumerate(zip(outputs, records)):
        print(f"image {i + 1}/{len(outputs)}: {path} (seed {record['seed']})", flush=True)
    total = sum(report.timings.values()) + sum(report.load_seconds.values())
    print(f"{len(outputs)} image(s) in {total:.1f} s, peak memory {max(report.peaks.values()) / 1e9:.2f} GB "
          f"(MLX {mx.__version__}, {mx.default_device()})")


def stop_with_the_others(group):
    """Under mlx.launch a failing process makes the launcher stop the others (SIGTERM): say so in one line."""
    import signal

    def stop(signum, frame):
        print(f"error: rank {group.rank}: another process of the run stopped; stopping too", file=sys.stderr, flush=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)


def png_info(record: dict):
    from PIL.PngImagePlugin import PngInfo

    from . import __version__, runs

    info = PngInfo()
    info.add_text("prompt", record["prompt"])
    info.add_text("parameters", f"model={record['model']}, size={record['width']}x{record['height']}, steps={record['steps']}, "
                                f"guidance={record['guidance']}, seed={record['seed']}")
    info.add_text(runs.METADATA_CHUNK, json.dumps(record, ensure_ascii=False))
    info.add_text("Software", f"mlx-glm-image {__version__}")
    return info


def write_image(image, path: Path, record: dict, png_text: bool, sidecar: bool):
    save_atomically(path, lambda f: image.save(f, format="PNG", pnginfo=png_info(record) if png_text else None))
    if sidecar:
        data = json.dumps(record, indent=2, ensure_ascii=False).encode("utf-8")
        save_atomically(path.with_suffix(".json"), lambda f: Path(f).write_bytes(data))


def save_atomically(path: Path, write):
    """Write next to the target and rename, so that an interrupted run never leaves half a file; the file's
    mode follows the umask (a temporary file is created 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
