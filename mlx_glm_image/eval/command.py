"""Know what a setting trades: text accuracy, closeness to a reference, time and memory, for each setting.

    PROG -m glm-image --setting "" --setting "-q 8" --setting "-q 4" --setting "--cache" --output eval-q
    PROG -m glm-image --reference "--steps 50" --setting "--steps 30" --setting "--steps 20" --output eval-steps
    PROG -m glm-image --prompt-file mine.jsonl --seeds 0 1 --setting "--guidance 1.5" --setting "--guidance 3" ...

Each setting is the flags of mlx-glm-image, as one string ("" for the defaults); the first (or --reference) is
the reference the others are compared with. Every prompt of the set is made under each setting at the same seeds,
then read back by an OCR engine. Per setting the report gives: word accuracy and NED over the quoted words (as
CVTG-2K scores them; Chinese per character), PSNR and SSIM against the reference's image of the same prompt and
seed, seconds per image (model loading apart) and peak memory. It prints a table and writes, in --output:
results.json, images/ (each image, its settings in the PNG) and sheet.png (one row per prompt, one column per
setting, the words read under each image). docs/eval.md says what each score means.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import Parser, fail, interrupting, prog_name

PROMPTS = Path(__file__).with_name("prompts.jsonl")  # the prompt set of our own (docs/eval.md)
# What the eval decides itself, so no setting may give it.
NOT_SETTINGS = ("prompt", "prompt_file", "seed", "auto_seeds", "num_images", "config_from_metadata", "output",
                "overwrite", "metadata", "no_metadata", "preview_dir", "previews", "print_config", "quiet", "check",
                "parallel", "parallel_timeout")
LOAD_KEYS = ("model", "quantize", "dtype", "memory", "vae_tiling", "lora")  # what needs a pipeline of its own


class EvalParser(Parser):
    """The command's parser: a --setting's value is taken whole, even one that starts with a dash ("--cache")."""

    def parse_args(self, args=None, namespace=None):
        return super().parse_args(joined(sys.argv[1:] if args is None else list(args)), namespace)


def build_parser() -> argparse.ArgumentParser:
    from .ocr import ENGINES

    prog = prog_name("python -m mlx_glm_image.eval")
    p = EvalParser(prog=prog, description=__doc__.replace("PROG", prog),
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="the pipeline folder or Hub repo id of every setting that names none "
                                         "(default: zai-org/GLM-Image)")
    p.add_argument("--setting", action="append", default=[], metavar="FLAGS",
                   help='mlx-glm-image flags, as one string: "-q 4", "--cache --rdt 0.12", "--steps 30" ("" for the '
                        "defaults); repeat for each setting. The first is the reference unless --reference is given")
    p.add_argument("--reference", metavar="FLAGS",
                   help="the reference setting, made first (default: the first --setting)")
    p.add_argument("--output", required=True, metavar="DIR", help="the folder for results.json, sheet.png and images/")
    p.add_argument("--prompt-file", metavar="PATH",
                   help=f"prompts as mlx-glm-image reads them (.txt, .jsonl, .json; default: the packaged set of "
                        f"{_count(PROMPTS)} English and Chinese prompts, {PROMPTS.name})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                   help="the seeds of every prompt (default: 0)")
    p.add_argument("--limit", type=int, metavar="N", help="the first N prompts only")
    p.add_argument("--ocr", choices=ENGINES, default="auto",
                   help="the engine that reads the images (auto: Apple Vision on a Mac with ocrmac, else rapidocr)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage report")
    return p


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def joined(argv: list[str]) -> list[str]:
    """--setting VALUE as --setting=VALUE, so that a value that starts with a dash ("--cache") is the value."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--setting", "--reference") and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# -- the plan: every setting parsed and every image planned, before any model loads ------------------------------

@dataclass
class Setting:
    """One column of the report: its flags, the run settings that make its pipeline, and its images (each with
    the index of its prompt in the file)."""

    label: str
    run: dict
    images: list[tuple[int, dict]]
    paths: list[Path] = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # seconds per image, loading seconds, peak memory

    @property
    def load_key(self) -> str:
        return json.dumps([self.run.get(k) for k in LOAD_KEYS], sort_keys=True, default=str)


def parse_setting(text: str, model: str | None, entries: list[dict], seeds: list[int]) -> Setting:
    """A setting's flags parsed by mlx-glm-image's own parser and planned as it plans a run; a ValueError names the
    setting and what is wrong with it."""
    from .. import generate, runs
    from ..pipeline.request import SETTINGS

    def error(message: str):
        raise ValueError(f"--setting {text!r}: {message}")

    try:
        argv = shlex.split(text)
    except ValueError as e:
        error(str(e))
    if {"-h", "--help"} & set(argv):
        error("mlx-glm-image --help lists the flags a setting can give")
    parser = generate.build_parser()
    parser.error = error  # argparse's own message, raised rather than printed
    args = parser.parse_args(argv)
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    taken = [flags[k] for k in NOT_SETTINGS if getattr(args, k, None) is not None]
    if taken:
        error(f"{taken[0]} is the eval's to give (it makes every prompt at --seeds into --output), not a setting's")
    args.model = args.model or model
    run, (image,) = generate.plan(argparse.Namespace(**{**vars(args), "prompt": "x", "seed": [0]}))
    defaults = {k: v for k, v in image.items() if k not in ("prompt", "seed")}
    images = [(n, planned) for n, entry in enumerate(entries) for planned in runs.plan_images([entry], seeds, defaults)]
    for _, planned in images:  # each value in its range now; the checkpoint's own limits when its pipeline is made
        for s in SETTINGS:
            if planned.get(s.key) is not None and s.check is not None:
                try:
                    s.check(planned[s.key])
                except ValueError as e:
                    error(str(e))
    return Setting(text.strip() or "(defaults)", run, images)


def plan(args) -> list[Setting]:
    """The settings, the reference first, each with its images."""
    from .. import runs
    from ..pipeline import checks

    texts = ([args.reference] if args.reference is not None else []) + args.setting
    if not texts:
        raise ValueError("give at least one --setting (the first is the reference)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    runs.check_count("--seeds", len(args.seeds))
    if len(set(args.seeds)) < len(args.seeds):
        raise ValueError(f"--seeds gives a seed twice: {' '.join(map(str, args.seeds))}")
    for seed in args.seeds:
        try:
            checks.check_seed(seed)
        except ValueError as e:
            raise ValueError(f"--seeds: {e}") from None
    entries = runs.read_prompt_file(args.prompt_file or str(PROMPTS))[:args.limit]
    return [parse_setting(text, args.model, entries, args.seeds) for text in texts]


def pipelines(settings: list[Setting], quiet: bool) -> list[tuple]:
    """(pipeline, [(setting, its requests)]) for each group of settings that load the same models (-m, -q,
    --dtype, --memory, --vae-tiling, --lora), every request checked against its checkpoint; nothing heavy is read."""
    from .. import generate
    from ..cli import load_adapters
    from ..pipeline import GlmImagePipeline

    groups: dict[str, list[Setting]] = {}
    for setting in settings:
        groups.setdefault(setting.load_key, []).append(setting)
    made = []
    for members in groups.values():
        run = members[0].run
        pipe = GlmImagePipeline.from_pretrained(run["model"], dtype=run["dtype"], quantize=run["quantize"],
                                                memory=run["memory"], verbose=not quiet,
                                                vae_tiling=generate.VAE_TILING[run["vae_tiling"]])
        missing = pipe.components.missing()
        if missing:
            raise ValueError(f"{run['model']} lacks {', '.join(m + '/' for m in missing)}")
        generate.check_configs(pipe)
        load_adapters(pipe, run.get("lora"))
        made.append((pipe, [(s, [pipe.request(**generate.call_arguments(i)) for _, i in s.images]) for s in members]))
    return made


# -- making the images -------------------------------------------------------------------------------------------

def make_all(groups: list[tuple], settings: list[Setting], folder: Path, quiet: bool):
    """Every setting's images, group by group; a group's models are freed before the next group loads its own."""
    import mlx.core as mx

    while groups:
        pipe, members = groups.pop(0)
        for setting, requests in members:
            k = settings.index(setting)
            if not quiet:
                print(f"setting {k + 1}/{len(settings)}: {setting.label} ({len(requests)} images)", flush=True)
            make(pipe, setting, requests, folder / f"setting{k + 1}")
        del pipe, members
        gc.collect()
        mx.clear_cache()


def make(pipe, setting: Setting, requests: list, folder: Path):
    """The setting's images, each written as it comes (its settings in the PNG), timed by the run's stage report."""
    from .. import metadata
    from ..pipeline.report import ProgressBars, StageReport

    folder.mkdir(parents=True, exist_ok=True)
    setting.paths = [folder / f"prompt{n + 1:03d}_seed{image['seed']}.png" for n, image in setting.images]
    report, bars = StageReport(pipe._log), ProgressBars(pipe.verbose)
    try:
        for event in pipe.stream_batch(requests):
            report.observe(event)
            bars.observe(event)
            if event.kind == "image":
                metadata.write(event.image, setting.paths[event.request], event.metadata)
    finally:
        bars.close()
    setting.measured = {"seconds_per_image": sum(report.timings.values()) / len(requests),
                        "load_seconds": sum(report.load_seconds.values()), "peak_memory_bytes": report.peak_memory}


# -- the scores --------------------------------------------------------------------------------------------------

def scored(settings: list[Setting], engine) -> list[dict]:
    """Per setting, its images read and compared with the reference's (score.py defines each score)."""
    import numpy as np
    from PIL import Image

    from . import score

    results = []
    for setting in settings:
        rows, texts = [], []
        for (n, image), path, reference in zip(setting.images, setting.paths, settings[0].paths):
            pixels = np.asarray(Image.open(path).convert("RGB"))
            expected = score.expected_words(image["prompt"])
            lines = engine.read(Image.fromarray(pixels))
            text = score.text_score(expected, score.read_words(lines, expected))
            row = {"prompt": n + 1, "seed": image["seed"], "path": str(path), "expected": expected, "read": lines,
                   "words": text["all"].words, "correct": text["all"].correct, "ned": text["all"].ned}
            if setting is not settings[0]:
                row.update(closeness(pixels, np.asarray(Image.open(reference).convert("RGB"))))
            rows.append(row)
            texts.append(text)
        results.append(summary(setting, rows, texts, setting is settings[0]))
    return results


def closeness(pixels, reference) -> dict:
    """MSE, PSNR (None when identical) and SSIM against the reference's image; all None when the sizes differ."""
    from . import score

    if pixels.shape != reference.shape:
        return {"mse": None, "psnr_db": None, "ssim": None}
    error = score.mse(pixels, reference)
    return {"mse": error, "psnr_db": score.psnr_from_mse(error) if error else None,
            "ssim": score.ssim(pixels, reference)}


def summary(setting: Setting, rows: list[dict], texts: list[dict], reference: bool) -> dict:
    """A setting's scores over its images (words pooled as CVTG-2K pools them; PSNR of the mean squared error)."""
    import math

    from . import score

    text = {key: score.TextScore() for key in (*score.LANGUAGES, "all")}
    for scores in texts:
        text = {key: text[key].add(scores[key]) for key in text}
    compared = [row for row in rows if row.get("mse") is not None]
    mean_mse = sum(r["mse"] for r in compared) / len(compared) if compared else None
    psnr = score.psnr_from_mse(mean_mse) if mean_mse is not None else None
    return {"setting": setting.label, "reference": reference,
            "run": {k: setting.run.get(k) for k in LOAD_KEYS},
            "images": len(rows), "words": text["all"].words,
            "word_accuracy": text["all"].word_accuracy, "ned": text["all"].ned,
            **{key: {"words": text[key].words, "word_accuracy": text[key].word_accuracy, "ned": text[key].ned}
               for key in score.LANGUAGES},
            "psnr_db": None if psnr is None or math.isinf(psnr) else psnr,
            "ssim": sum(r["ssim"] for r in compared) / len(compared) if compared else None,
            "compared_images": len(compared), "identical_images": sum(1 for r in compared if r["mse"] == 0),
            "seconds_per_image": setting.measured["seconds_per_image"],
            "load_seconds": setting.measured["load_seconds"],
            "peak_memory_gb": setting.measured["peak_memory_bytes"] / 1e9,
            "per_image": rows}


# -- the report --------------------------------------------------------------------------------------------------

COLUMNS = ("setting", "words", "word acc", "NED", "acc EN", "acc ZH", "PSNR dB", "SSIM", "s/image", "peak GB")


def number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def closeness_cells(r: dict) -> tuple[str, str]:
    """PSNR and SSIM as the table shows them: "reference", "identical" (every image equal to it), or numbers."""
    if r["reference"]:
        return "reference", ""
    same = r["compared_images"] and r["identical_images"] == r["compared_images"]
    return "identical" if same else number(r["psnr_db"], 2), number(r["ssim"], 4)


def table(results: list[dict]) -> str:
    """The scores as a table for the screen."""
    lines = [COLUMNS]
    for r in results:
        lines.append((r["setting"], str(r["words"]), number(r["word_accuracy"], 4), number(r["ned"], 4),
                      number(r["en"]["word_accuracy"], 4), number(r["zh"]["word_accuracy"], 4), *closeness_cells(r),
                      number(r["seconds_per_image"], 2), number(r["peak_memory_gb"], 2)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    rows = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    return "\n".join([rows[0], "  ".join("-" * w for w in widths), *rows[1:]])


def sheets(settings: list[Setting], results: list[dict], folder: Path) -> list[Path]:
    """The contact sheets: one per seed (sheet.png when there is one), one row per prompt, one column per setting."""
    from ..pipeline.glyphs import get_glyph_texts
    from .score import read_words
    from .sheet import Cell, contact_sheet

    seeds = sorted({image["seed"] for _, image in settings[0].images})
    written = []
    for seed in seeds:
        rows = []
        for i, (n, image) in enumerate(settings[0].images):
            if image["seed"] != seed:
                continue
            quoted = " | ".join(get_glyph_texts(image["prompt"])[0])
            label = f"#{n + 1} {image.get('width')}x{image.get('height')} seed {seed}: {quoted}"
            cells = []
            for setting, result in zip(settings, results):
                row = result["per_image"][i]
                expected = frozenset(row["expected"])
                cells.append(Cell(setting.paths[i], read_words(row["read"], row["expected"]), expected))
            rows.append((label, cells))
        path = folder / ("sheet.png" if len(seeds) == 1 else f"sheet_seed{seed}.png")
        contact_sheet([s.label for s in settings], rows).save(path)
        written.append(path)
    return written


def report(args, settings: list[Setting], results: list[dict], engine, folder: Path):
    """The table on the screen, results.json and the contact sheets in ``folder``."""
    from .. import atomic

    document = {"ocr": engine.name, "prompt_file": args.prompt_file or f"(packaged) {PROMPTS.name}",
                "seeds": args.seeds, "reference": settings[0].label, "settings": results}
    with atomic.replacing(folder / "results.json") as tmp:
        tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8")
    written = sheets(settings, results, folder)
    print(f"OCR: {engine.name}; {len(settings[0].images)} images per setting; reference: {settings[0].label}")
    print(table(results))
    print(f"wrote {folder / 'results.json'}, {', '.join(str(p) for p in written)} and {folder / 'images'}/")


# -- the command -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    try:
        with interrupting():
            return _main(argv)
    except KeyboardInterrupt:
        print("interrupted; the images made so far are in the --output folder, under images/", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from .. import generate
    from ..cli import import_whole
    from ..loading import WeightsError
    from . import ocr

    args = build_parser().parse_args(argv)
    folder = Path(args.output).expanduser()
    try:
        import_whole("mlx_glm_image.pipeline")  # MLX and numpy, which the settings' parser needs
        settings = plan(args)
        generate.writable_folder(folder, f"--output {folder}")
        engine = ocr.engine(args.ocr)
        groups = pipelines(settings, args.quiet)
        make_all(groups, settings, folder / "images", args.quiet)
        if not args.quiet:
            print(f"reading the images with {engine.name}", flush=True)
        results = scored(settings, engine)
        report(args, settings, results, engine, folder)
    except (ValueError, WeightsError, RuntimeError, OSError) as e:
        return fail(e)
    return 0
