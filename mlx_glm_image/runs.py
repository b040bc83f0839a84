"""Many images in one run, reproducibly: what each image is (prompt, seed, size, ...) and where it goes. Used by
the CLI; nothing here loads a model.

An image's settings are one dict keyed by the name table's metadata keys (pipeline/request.py: prompt, seed,
height, width, steps, guidance, ...): the keys of prompt files and of the metadata (metadata.py) alike.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path

from .metadata import sidecar_path
from .pipeline.checks import parse_size, read_json, read_text
from .pipeline.request import BY_KEY

TEMPLATE_FIELDS = {"seed", "index", "prompt"}


MAX_IMAGES = 10_000  # per run: a week of images on a Mac; the plan of each is held in memory


def read_prompt_file(path: str) -> list[dict]:
    """A .txt file (one prompt per line), .jsonl (one object per line: "prompt" and per-image overrides) or .json
    (a list of such objects); each entry checked, by line or item number, before any work."""
    kind = Path(path).suffix.lower()
    if kind == ".json":
        items = read_json(path, "--prompt-file")
        if not isinstance(items, list):
            raise ValueError(f"--prompt-file {path}: a .json prompt file holds a list of objects")
        numbered = [(f"item {n}", item) for n, item in enumerate(items, 1)]
    else:
        text = read_text(path, "--prompt-file")
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if kind == ".jsonl":
            numbered = [(f"line {n}", _json_line(path, n, line)) for n, line in lines]
        else:
            numbered = [(f"line {n}", {"prompt": line.strip()}) for n, line in lines]
    if not numbered:
        raise ValueError(f"--prompt-file {path} has no prompt")
    return [_entry(path, where, item) for where, item in numbered]


def _json_line(path, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"--prompt-file {path} line {n} is not JSON: {e.msg}") from None


def _entry(path, where: str, entry) -> dict:
    """One prompt file entry as settings by metadata key, each of its type (request.Setting.from_json)."""
    unknown = sorted(set(entry) - set(BY_KEY) - {"size"}) if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or "prompt" not in entry or unknown:
        raise ValueError(f"--prompt-file {path} {where}: an object with \"prompt\" and any of "
                         f"{', '.join(k for k in BY_KEY if k != 'prompt')}, size" + (f"; not {unknown}" if unknown else ""))
    entry = dict(entry)
    if isinstance(entry.get("image"), str):
        entry["image"] = [entry["image"]]
    try:
        if "size" in entry:  # "WxH" as the server's body says it; "auto": the run's size
            width, height = parse_size(entry.pop("size"))
            if width is not None:
                entry["width"], entry["height"] = width, height
        return {k: BY_KEY[k].from_json(v) for k, v in entry.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"--prompt-file {path} {where}: {e}") from None


def seeds_for(seeds: list[int] | None, auto_seeds: int | None, num_images: int) -> list[int]:
    """One seed per image: the given ones; N random ones; or N consecutive from the given (or a random) one."""
    if auto_seeds is not None:
        if seeds:
            raise ValueError("--auto-seeds and --seed do not go together")
        check_count("--auto-seeds", auto_seeds)
        return random.sample(range(2**31), auto_seeds)
    check_count("--num-images", num_images)
    if seeds and len(seeds) > 1 and num_images > 1:
        raise ValueError("--num-images counts from one --seed; with several seeds, each gives one image")
    start = seeds[0] if seeds else random.randrange(2**31)
    return list(seeds) if seeds and len(seeds) > 1 else [start + i for i in range(num_images)]


def check_count(flag: str, n: int):
    """A count the seeds are made from (before plan_images, which bounds the run as a whole)."""
    if not 1 <= n <= MAX_IMAGES:
        raise ValueError(f"{flag} must be from 1 to {MAX_IMAGES} (images in one run), got {n}")


def plan_images(entries: list[dict], seeds: list[int], defaults: dict) -> list[dict]:
    """Every image of the run: each prompt entry once per seed (an entry with its own seed: once)."""
    count = sum(1 if "seed" in entry else len(seeds) for entry in entries)
    if count > MAX_IMAGES:
        raise ValueError(f"the run would make {count} images ({len(entries)} prompts x {len(seeds)} seeds); a run "
                         f"makes at most {MAX_IMAGES}")
    images = []
    for entry in entries:
        for seed in [entry["seed"]] if "seed" in entry else seeds:
            images.append({**defaults, **entry, "seed": seed})
    return images


def slug(text: str, length: int = 40) -> str:
    """A short file-safe form of a prompt."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:length].strip("-").lower() or "image"


def output_paths(template: str, images: list[dict], overwrite: bool,
                 sidecar: bool = False) -> list[tuple[Path, Path | None]]:
    """(path, the path it was asked as when it had to move aside) per image.

    ``template`` may hold {seed}, {index} (0-based) and {prompt} (a slug); without fields, several images get
    _1, _2, ... An existing file, or one written earlier in the run, is never overwritten unless ``overwrite``:
    a numeric suffix is added instead. With ``sidecar`` (--metadata) a name is free only when its NAME.json is
    free too: the pair moves on together."""
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if fields - TEMPLATE_FIELDS:
        raise ValueError(f"--output: unknown field {{{sorted(fields - TEMPLATE_FIELDS)[0]}}}; use {{seed}}, {{index}} or {{prompt}}")
    if Path(template).suffix.lower() != ".png":
        raise ValueError(f"--output must end in .png, got {template}")
    taken, out = set(), []
    for i, image in enumerate(images):
        if fields:
            path = Path(template.format(seed=image["seed"], index=i, prompt=slug(image["prompt"])))
        else:
            base = Path(template)
            path = base if len(images) == 1 else base.with_name(f"{base.stem}_{i + 1}{base.suffix}")
        path = path.expanduser()
        if path.is_dir():
            raise ValueError(f"--output {path} is a folder")
        asked = path
        while path in taken or (existing(path, sidecar) and not overwrite):
            path = next_name(asked, path)
        taken.add(path)
        out.append((path, asked if path != asked else None))
    return out


def existing(path: Path, sidecar: bool) -> Path | None:
    """The file of an image's name that exists already: the PNG, or with ``sidecar`` its JSON; else None."""
    for name in [path] + ([sidecar_path(path)] if sidecar else []):
        if name.exists() or name.is_symlink():
            return name
    return None


def next_name(asked: Path, path: Path) -> Path:
    """The name after ``path`` for an image asked as ``asked``: NAME-2.png, NAME-3.png, ..."""
    k = int(path.stem[len(asked.stem) + 1:]) + 1 if path != asked else 2
    return asked.with_name(f"{asked.stem}-{k}{asked.suffix}")
