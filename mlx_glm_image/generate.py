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
from dataclasses import dataclass, field
from pathlib import Path

from .cli import (Parser, above_zero, add_cache_arguments, add_model_arguments, cache_settings, fail, import_whole,
                  interrupting, load_adapters, model_defaults, prog_name)

# The run's own settings when not given (the image settings' defaults are the pipeline's: request.py).
RUN_DEFAULTS = dict(output="glm-image.png", num_images=1, vae_tiling="auto")
PREVIEWS = 4  # with --preview-dir and no --previews
VAE_TILING = {"auto": None, "on": True, "off": False}


def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None, so a run knows what the user gave (it overrides --config-from-metadata);
    the defaults fill the rest. The image settings come from the name table (pipeline/request.py)."""
    from .pipeline.parallel import MODES
    from .pipeline.request import CONFIGS, SETTINGS

    prog = prog_name("python -m mlx_glm_image.generate")
    p = Parser(prog=prog, description=__doc__.replace("PROG", prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to draw")
    for s in SETTINGS:
        if s.type in CONFIGS:
            continue  # the step cache's group, below
        many = {"image": dict(action="append", metavar="PATH"), "seed": dict(nargs="+", metavar="S")}.get(s.name, {})
        what.add_argument(s.flag, dest=s.key, type=None if s.type is str else s.type, help=s.help, **many)
    what.add_argument("--prompt-file", metavar="PATH",
                      help="one prompt per line (.txt), or one JSON object per line (.jsonl): \"prompt\" and per-image "
                           "\"seed\", \"size\" (WxH), \"steps\", \"guidance\", \"image\", \"temperature\", \"top_p\", \"top_k\"")
    add_cache_arguments(p.add_argument_group("step cache (faster denoising; cache-dit's DBCache and its names)"))
    seeds = p.add_argument_group("how many")
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
    out.add_argument("--preview-dir", metavar="DIR",
                     help="write live previews of the denoising there as they come (--previews of them, default 4): "
                          "OUTPUT-NAME_preview-J_step-S.png")
    out.add_argument("--no-metadata", action="store_true", default=None, help="do not write the settings into the PNG")
    out.add_argument("--print-config", action="store_true", default=None,
                     help="print each image's resolved settings and path, and stop (no model is loaded)")
    out.add_argument("--quiet", action="store_true", default=None, help="no progress bars or stage report")
    model = p.add_argument_group("model")
    add_model_arguments(model, fill_defaults=False)
    model.add_argument("--vae-tiling", choices=list(VAE_TILING),
                       help="decode in overlapping tiles to bound memory (default: auto, above 1024x1024 pixels)")
    model.add_argument("--check", action="store_true", default=None,
                       help="say whether this machine can run -m (memory modes and -q widths that fit, free disk, "
                            "the Hub) from the file sizes, download nothing, and stop: exit 0 when it can, 1 when not")
    par = p.add_argument_group("several processes or Macs (under mlx.launch)")
    par.add_argument("--parallel", choices=list(MODES),
                     help="cfg: 2 processes, one runs the conditional and one the unconditional DiT passes of every "
                          "step; data: the run's images divided over the processes; tensor: N processes, each holds "
                          "and computes 1/N of the DiT's blocks and the AR model; cfg,tensor: 2N, guidance split in "
                          "two groups, each tensor-split N ways")
    par.add_argument("--parallel-timeout", type=above_zero("seconds"),
                     help="seconds a process waits for the others before it stops with an error (default: 600)")
    return p


def plan(args) -> tuple[dict, list[dict]]:
    """(the run's settings, one settings dict per image, by metadata key): recorded metadata, then the flags
    given, then the defaults."""
    from . import metadata, runs
    from .pipeline.request import SETTINGS

    given = {k: v for k, v in vars(args).items() if v is not None}
    recorded = metadata.read(args.config_from_metadata) if args.config_from_metadata else {}
    run = {**model_defaults(), **RUN_DEFAULTS, **{k: recorded[k] for k in metadata.RUN_KEYS if k in recorded}, **given}
    run.setdefault("quantize", None)
    image = {s.key: recorded.get(s.key) for s in SETTINGS if s.key not in ("prompt", "seed")}
    image.update({s.key: given[s.key] for s in SETTINGS if s.key in given and s.key not in ("prompt", "seed")})
    image.update(cache_settings(args) or {})
    if run.get("preview_dir") and image.get("previews") is None:
        image["previews"] = PREVIEWS
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


def call_arguments(image: dict) -> dict:
    """One image's settings (by metadata key) as the pipeline's call arguments; unset ones take its defaults."""
    from .pipeline.request import SETTINGS

    return {s.name: image[s.key] for s in SETTINGS if image.get(s.key) is not None}


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


def prepare(pipe, run: dict, images: list[dict]) -> tuple[list, list]:
    """Every image's request, checked and resolved (size, sampling) before any weight is read, and the
    (path, moved-from) outputs."""
    from . import atomic, runs

    outputs = runs.output_paths(run["output"], images, bool(run.get("overwrite")))
    missing = pipe.components.missing()  # configs were read, no weights
    if missing:
        raise ValueError(f"{run['model']} lacks {', '.join(m + '/' for m in missing)}")
    requests = [pipe.request(**call_arguments(image)) for image in images]
    previews = [Path(run["preview_dir"]).expanduser() / "preview.png"] if run.get("preview_dir") else []
    check_output([p for p, _ in outputs] + previews, [(r.height, r.width) for r in requests])
    for folder in {p.parent for p, _ in outputs} | {p.parent for p in previews}:
        if folder.is_dir():  # what runs killed while writing (SIGKILL: no handler ran) left there
            atomic.remove_stale_in(folder)
    return requests, outputs


def run(args, tally: "Tally") -> list[Path]:
    from .pipeline import GlmImagePipeline

    settings, images = plan(args)
    pipe = GlmImagePipeline.from_pretrained(settings["model"], dtype=settings["dtype"], quantize=settings["quantize"],
                                            memory=settings["memory"], verbose=not settings.get("quiet"),
                                            vae_tiling=VAE_TILING[settings["vae_tiling"]], parallel=settings.get("parallel"),
                                            parallel_timeout=settings.get("parallel_timeout") or 600.0)
    if pipe.placement.distributed:
        join_the_others(pipe, settings, images, random_seeds=args.seed is None)
    load_adapters(pipe, settings.get("lora"))
    requests, outputs = prepare(pipe, settings, images)
    pipe.placement.barrier()  # every process has planned its output paths before any is written
    if settings.get("print_config"):
        for (path, _), request in zip(outputs, requests):
            print(json.dumps({"output": str(path), **pipe.record(request)}, ensure_ascii=False))
        return []
    for path, asked in outputs:
        if asked is not None:
            print(f"{asked} exists: writing {path}", file=sys.stderr)
    paths = [p for p, _ in outputs]
    tally.planned = len(paths)
    report = generate(pipe, requests, paths, settings, [asked or p for p, asked in outputs], tally)
    pipe.placement.barrier()
    if not settings.get("quiet"):
        print_report(paths, requests, report)
    return paths


def generate(pipe, requests: list, paths: list[Path], settings: dict, asked: list[Path], tally: "Tally"):
    """Consume the run's events: the bars, the stage report, and each image written as soon as it is made (at
    ``paths``, or, when another run took a name meanwhile, the next free name after it, put in ``paths``), and
    counted in ``tally``."""
    from . import atomic
    from .pipeline.report import ProgressBars, StageReport

    report, bars = StageReport(pipe._log), ProgressBars(not settings.get("quiet"))
    try:
        for event in pipe.stream_batch(requests):
            report.observe(event)
            bars.observe(event)
            if event.kind == "image":
                try:
                    paths[event.request] = write_image(event, paths[event.request], asked[event.request], settings)
                except atomic.InterruptedAfterCommit as e:  # the image is in place: it counts
                    tally.written.append(e.dst)
                    raise
                tally.written.append(paths[event.request])
            elif event.kind == "preview" and settings.get("preview_dir"):
                write_preview(event, paths[event.request], Path(settings["preview_dir"]).expanduser())
    except RuntimeError as e:
        rank = pipe.placement
        raise RuntimeError(f"rank {rank.rank}: {e}" if rank.distributed else str(e)) from None
    finally:
        bars.close()
    return report


def write_image(event, path: Path, asked: Path, settings: dict) -> Path:
    """The image at ``path``, never over an existing file unless --overwrite: a name another run took since the
    run was planned moves it on to the next free one (said); returns where it went."""
    from . import metadata, runs

    while True:
        try:
            metadata.write(event.image, path, event.metadata, png_text=not settings.get("no_metadata"),
                           sidecar=bool(settings.get("metadata")), overwrite=bool(settings.get("overwrite")))
            return path
        except FileExistsError:
            taken, path = path, runs.next_name(asked, path)
            print(f"{taken} exists now: writing {path}", file=sys.stderr)


def write_preview(event, output: Path, folder: Path):
    from . import atomic

    suffix = f"_{event.image_index + 1}" if event.image_index else ""
    name = f"{output.stem}{suffix}_preview-{event.index + 1}_step-{event.step + 1}.png"
    with atomic.replacing(folder / name) as tmp:
        event.image.save(tmp, format="PNG")


@dataclass
class Tally:
    """The images of a run written so far, for what an interruption says, whenever it comes."""

    planned: int = 0
    written: list = field(default_factory=list)

    def interrupted(self) -> str:
        if not self.written:
            return "interrupted; no image written"
        return f"interrupted; {len(self.written)} of {self.planned} image(s) written (the last: {self.written[-1]})"


def join_the_others(pipe, settings: dict, images: list[dict], random_seeds: bool):
    """Under mlx.launch: rank 0 reports, random seeds are rank 0's, and a stopped peer stops this process too."""
    import mlx.core as mx

    group = pipe.placement
    settings["quiet"] = settings.get("quiet") or not group.leader
    pipe.verbose = not settings["quiet"]
    stop_with_the_others(group)
    if random_seeds:
        seeds = group.broadcast(mx.array([i["seed"] for i in images], dtype=mx.int64)).tolist()
        for image, seed in zip(images, seeds):
            image["seed"] = seed


def print_report(paths, requests, report):
    import mlx.core as mx

    for i, (path, request) in enumerate(zip(paths, requests)):
        print(f"image {i + 1}/{len(paths)}: {path} (seed {request.seed})", flush=True)
    print(f"{len(paths)} image(s) in {report.total_seconds:.1f} s, peak memory {report.peak_memory / 1e9:.2f} GB "
          f"(MLX {mx.__version__}, {mx.default_device()})")


def stop_with_the_others(group):
    """Under mlx.launch a failing process makes the launcher stop the others (SIGTERM): say so in one line."""
    import signal

    def stop(signum, frame):
        print(f"error: rank {group.rank}: another process of the run stopped; stopping too", file=sys.stderr, flush=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    tally = Tally()
    try:
        with interrupting():  # from the first moment: the imports are inside
            import_whole("mlx_glm_image.pipeline")  # MLX and numpy, which the parser's name table needs
            return _main(argv, tally)
    except KeyboardInterrupt:
        print(tally.interrupted(), file=sys.stderr)
        return 130


def _main(argv: list[str] | None, tally: Tally) -> int:
    args = build_parser().parse_args(argv)
    if args.check:
        from .preflight import main as check

        return check(args)
    from .loading import WeightsError

    try:
        run(args, tally)
    except (ValueError, WeightsError, RuntimeError, OSError) as e:  # OSError: disk full, permissions
        return fail(e)
    return 0


if __name__ == "__main__":
    from .cli import done

    sys.exit(done(main()))
