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
from functools import partial
from pathlib import Path

from .cli import (Parser, above_zero, add_cache_arguments, add_model_arguments, cache_settings, fail, import_whole,
                  interrupting, load_adapters, lora_entries, model_defaults, prog_name)

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
    if "parallel" in recorded:  # where the recorded image was made: compared with this run's placement (run)
        run["recorded_parallel"] = recorded["parallel"]
    if args.lora:  # checked as they enter (a scale that is not a finite number: one line, before any work)
        run["lora"] = lora_entries(args.lora)
    image = {s.key: recorded.get(s.key) for s in SETTINGS if s.key not in ("prompt", "seed")}
    image.update({s.key: given[s.key] for s in SETTINGS if s.key in given and s.key not in ("prompt", "seed")})
    image.update(cache_settings(args) or {})
    check_preview_flags(run.get("preview_dir"), args.previews)
    if run.get("preview_dir") and image.get("previews") is None:
        image["previews"] = PREVIEWS
    if args.prompt_file and args.prompt is not None:
        raise ValueError("--prompt and --prompt-file do not go together: give one (put the prompt in the file)")
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
    images = runs.plan_images(entries, seeds, image)
    if args.previews:
        check_preview_count(args.previews, images)
    return run, images


def check_preview_flags(folder: str | None, previews: int | None):
    """--previews and --preview-dir go together, and the folder is named (an empty one would be the current one)."""
    if folder is not None and not folder.strip():
        raise ValueError("--preview-dir is empty: name the folder the previews go to")
    if previews and folder is None:
        raise ValueError(f"--previews {previews} needs --preview-dir (the folder the previews go to)")


def check_preview_count(previews: int, images: list[dict]):
    """--previews N takes N below every image's steps: a preview comes after a step, and the last step's image is
    the result itself (pipeline/preview.py); the default 4 takes what there is."""
    from .pipeline.request import BY_KEY

    steps = min(image.get("steps") or BY_KEY["steps"].default for image in images)
    if previews >= steps:
        raise ValueError(f"--previews {previews} with {steps} steps: at most {steps - 1} (a preview comes after a "
                         "step, and the last step's image is the result itself)")


def check_flags(args):
    """--check: the run's flags checked as the run checks them before it loads a weight (the plan: prompts, seeds,
    counts, previews; each image setting's range; the output's place; the condition images; the adapters), so that
    its verdict is for the run as given. No prompt is needed; what depends on the checkpoint (the size multiple,
    the prompt's length in tokens) is the run's to check, and an adapter on the Hub is not fetched."""
    from . import loading, lora, runs
    from .pipeline.image_processor import load_image
    from .pipeline.request import SETTINGS

    if args.parallel:
        raise ValueError("--check answers for one process that holds every model and does not take --parallel: "
                         "run it without (docs/parallel.md says what each process of a split holds)")
    stand_in = args.prompt is None and not args.prompt_file and not args.config_from_metadata
    settings, images = plan(argparse.Namespace(**{**vars(args), "prompt": "x"}) if stand_in else args)
    for image in images:
        for s in SETTINGS:
            if image.get(s.key) is not None and s.check is not None:
                s.check(image[s.key])
        for path in image.get("image") or []:
            load_image(path)
    if args.output is not None:
        outputs = runs.output_paths(settings["output"], images, bool(settings.get("overwrite")),
                                    bool(settings.get("metadata")))
        for path, _ in outputs:
            writable_folder(path.parent, f"--output {path}")
    if args.preview_dir is not None:
        writable_folder(Path(args.preview_dir).expanduser(), f"--preview-dir {args.preview_dir}")
    for entry in settings["lora"] if args.lora else []:  # plan parsed them (lora_entries)
        if loading.is_local(entry["source"]):
            lora.read(entry["source"], entry["name"], origin="--lora")
            continue
        try:
            loading.check_repo_id(entry["source"])
        except loading.WeightsError as e:
            raise lora.LoraError(f"--lora {e}") from None


def call_arguments(image: dict) -> dict:
    """One image's settings (by metadata key) as the pipeline's call arguments; unset ones take its defaults."""
    from .pipeline.request import SETTINGS

    return {s.name: image[s.key] for s in SETTINGS if image.get(s.key) is not None}


def check_output(paths: list[Path], sizes: list[tuple[int, int]]):
    """Each PNG can be written: its folder exists or can be made and is writable (runs.output_paths refuses a
    path that is a folder), and the disk has room."""
    for path in paths:
        folder = writable_folder(path.parent, f"--output {path}")
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"--output {path}: no permission to write there")
    need = sum(3 * h * w + (1 << 20) for h, w in sizes)  # an uncompressed RGB image each, at most
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(f"--output: {folder} has {free >> 20} MB free; {len(paths)} image(s) need up to {need >> 20} MB")


def writable_folder(folder: Path, said: str) -> Path:
    """The nearest existing folder at or above ``folder`` (where it would be made), which must be a writable
    folder; ``said`` starts the line that says otherwise (the flag and what it gave)."""
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{said}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{said}: no permission to write there")
    return folder


def check_configs(pipe):
    """Every model's config.json builds its model (nothing is read or allocated): a config the model cannot take
    (zero heads) is refused now, not when its stage comes after minutes of the others."""
    from .pipeline.components import MODELS

    for name in MODELS:
        pipe.components.skeleton(name)


def prepare(pipe, run: dict, images: list[dict]) -> tuple[list, list]:
    """Every image's request, checked and resolved (size, sampling) before any weight is read, and the
    (path, moved-from) outputs."""
    from . import atomic, runs

    outputs = runs.output_paths(run["output"], images, bool(run.get("overwrite")), bool(run.get("metadata")))
    missing = pipe.components.missing()  # configs were read, no weights
    if missing:
        raise ValueError(f"{run['model']} lacks {', '.join(m + '/' for m in missing)}")
    check_configs(pipe)
    requests = [pipe.request(**call_arguments(image)) for image in images]
    check_output([p for p, _ in outputs], [(r.height, r.width) for r in requests])
    previews = [Path(run["preview_dir"]).expanduser()] if run.get("preview_dir") else []
    for folder in previews:
        writable_folder(folder, f"--preview-dir {run['preview_dir']}")
    for folder in {p.parent for p, _ in outputs} | set(previews):
        if folder.is_dir():  # what runs killed while writing (SIGKILL: no handler ran) left there
            atomic.remove_stale_in(folder)
    return requests, outputs


def run(args, tally: "Tally") -> list[Path]:
    from . import runs
    from .pipeline import GlmImagePipeline

    settings, images = plan(args)
    pipe = GlmImagePipeline.from_pretrained(settings["model"], dtype=settings["dtype"], quantize=settings["quantize"],
                                            memory=settings["memory"], verbose=not settings.get("quiet"),
                                            vae_tiling=VAE_TILING[settings["vae_tiling"]], parallel=settings.get("parallel"),
                                            parallel_timeout=settings.get("parallel_timeout") or 600.0)
    if pipe.placement.distributed:
        join_the_others(pipe, settings, images, random_seeds=args.seed is None)
    warn_of_another_split(pipe.placement, settings, args.config_from_metadata)
    load_adapters(pipe, settings.get("lora"),
                  "--lora" if args.lora else f"--config-from-metadata {args.config_from_metadata}: adapter")
    requests, outputs = prepare(pipe, settings, images)
    pipe.placement.barrier()  # every process has planned its output paths before any is written
    if settings.get("print_config"):
        for (path, _), request in zip(outputs, requests):
            print(json.dumps({"output": str(path), **pipe.record(request)}, ensure_ascii=False))
        return []
    for path, asked in outputs:
        if asked is not None:
            print(f"{runs.existing(asked, bool(settings.get('metadata'))) or asked} exists: writing {path}",
                  file=sys.stderr)
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
    counted in ``tally`` the moment it is in place (with its JSON), whatever signal comes next."""
    from .pipeline.report import ProgressBars, StageReport

    report, bars = StageReport(pipe._log), ProgressBars(not settings.get("quiet"))
    try:
        for event in pipe.stream_batch(requests):
            report.observe(event)
            bars.observe(event)
            if event.kind == "image":
                paths[event.request] = write_image(event, paths[event.request], asked[event.request], settings,
                                                   tally.written.append)
            elif event.kind == "preview" and settings.get("preview_dir"):
                write_preview(event, paths[event.request], Path(settings["preview_dir"]).expanduser())
    except RuntimeError as e:
        rank = pipe.placement
        raise RuntimeError(f"rank {rank.rank}: {e}" if rank.distributed else str(e)) from None
    finally:
        bars.close()
    return report


def write_image(event, path: Path, asked: Path, settings: dict, written=None) -> Path:
    """The image at ``path`` (and with --metadata its JSON, one unit), never over an existing file unless
    --overwrite: a name (PNG or JSON) another run or the user took since the run was planned moves the pair on to
    the next free one (said); returns where it went. ``written(path)`` runs the moment the files are in place."""
    from . import metadata, runs

    while True:
        try:
            metadata.write(event.image, path, event.metadata, png_text=not settings.get("no_metadata"),
                           sidecar=bool(settings.get("metadata")), overwrite=bool(settings.get("overwrite")),
                           on_commit=None if written is None else partial(written, path))
            return path
        except FileExistsError as e:
            path = runs.next_name(asked, path)
            print(f"{e.filename} exists now: writing {path}", file=sys.stderr)


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

    def said(self) -> str:
        if not self.written:
            return "no image written"
        return f"{len(self.written)} of {self.planned} image(s) written (the last: {self.written[-1]})"

    def interrupted(self) -> str:
        return f"interrupted; {self.said()}"


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


def warn_of_another_split(placement, settings: dict, source: str | None):
    """One line (rank 0's) when the recorded image was made under a placement whose rounding differs from this
    run's (a tensor split): regenerating it still runs, as the user asked, and says it may differ."""
    from .pipeline.parallel import rounding_warning

    line = rounding_warning(settings["recorded_parallel"], placement) if "recorded_parallel" in settings else None
    if line and placement.leader:
        print(f"warning: --config-from-metadata {source}: {line}", file=sys.stderr)


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
    from .loading import WeightsError

    args = build_parser().parse_args(argv)
    if args.check:
        from .preflight import main as check

        try:
            check_flags(args)
        except (ValueError, WeightsError, OSError) as e:
            return fail(e)
        return check(args)
    try:
        run(args, tally)
    except (ValueError, WeightsError, RuntimeError, OSError) as e:  # OSError: disk full, permissions
        return fail(e, tally.said() if tally.planned else None)  # once writing began: what is on disk
    return 0


if __name__ == "__main__":
    from .cli import done

    sys.exit(done(main()))
