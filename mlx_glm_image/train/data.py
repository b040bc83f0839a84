"""The training data: its two formats read, every record checked up front (one line each, naming its line or file,
before any model loads), each image's training size, and the order of the batches.

Formats (docs/training.md): a folder with ``metadata.jsonl`` (the upstream recipe's: ``{"image": ..., "prompt":
...}`` per line, or for editing ``{"source": ..., "target": ..., "prompt": ...}``, the paths relative to the folder),
else a folder of images each with a same-name ``.txt`` caption (mflux's).

Sizes: each image trains at its own aspect ratio, resized to about ``resolution`` squared pixels with each side a
multiple of the model's (32); a batch holds examples of one size only (aspect buckets), so nothing is cropped.

Order: each epoch's batches are drawn from the seed and the epoch alone, so a resumed run continues the order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..pipeline.checks import check_size, described

METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KEYS = {"text-to-image": ("image", "prompt"), "editing": ("source", "target", "prompt")}
SHOWN_ERRORS = 20  # bad records said one line each, up to this many


class DataError(ValueError):
    """Bad records: one line each (``lines``)."""

    def __init__(self, lines: list[str]):
        shown = lines[:SHOWN_ERRORS] + ([f"... and {len(lines) - SHOWN_ERRORS} more"] if len(lines) > SHOWN_ERRORS else [])
        super().__init__("\n".join(shown))
        self.lines = shown


@dataclass(frozen=True, kw_only=True)
class Example:
    """One training example, checked: the image it learns to make (at ``height`` x ``width``), its prompt, and
    for editing the image it starts from."""

    where: str  # its line or file, as the messages name it
    image: Path
    prompt: str
    height: int
    width: int
    source: Path | None = None
    source_size: tuple[int, int] | None = None  # (width, height) of the source as stored

    @property
    def bucket(self) -> tuple:
        """What the examples of one batch share: the size, and for editing the source's size."""
        return self.height, self.width, self.source_size


@dataclass(frozen=True, kw_only=True)
class Record:
    """One record as the data folder gives it, not checked yet."""

    where: str
    image: Path | None = None
    prompt: object = None
    source: Path | None = None
    problem: str | None = None  # what makes it unreadable as a record at all


def read_records(folder: str, flag: str = "--data") -> list[Record]:
    """The records of a data folder in either format; a folder that holds neither is one line."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"{flag} {folder} is not a folder" if root.exists() else f"{flag} {folder} does not exist")
    if (root / METADATA).is_file():
        return _jsonl_records(root / METADATA)
    records = _caption_records(root)
    if not records:
        raise ValueError(f"{flag} {folder} holds no {METADATA} and no images with same-name .txt captions")
    return records


def _jsonl_records(path: Path) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    records = [_jsonl_record(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no record")
    return records


def _jsonl_record(path: Path, n: int, line: str) -> Record:
    where = f"{path} line {n}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return Record(where=where, problem=f"not JSON: {e.msg}")
    forms = " or ".join("{" + ", ".join(f'"{k}"' for k in keys) + "}" for keys in KEYS.values())
    if not isinstance(item, dict):
        return Record(where=where, problem=f"a record is an object, {forms}; got {described(item)}")
    keys = KEYS["editing"] if "source" in item or "target" in item else KEYS["text-to-image"]
    unknown, missing = sorted(set(item) - set(keys)), [k for k in keys if k not in item]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        return Record(where=where, problem=f"{what}; a record is {forms}")
    paths = {k: item[k] for k in keys if k != "prompt"}
    bad = next((k for k, v in paths.items() if not isinstance(v, str) or not v.strip()), None)
    if bad:
        return Record(where=where, problem=f"{bad!r} must be a file's path, got {described(paths[bad])}")
    image = path.parent / (paths.get("image") or paths["target"])
    source = path.parent / paths["source"] if "source" in paths else None
    return Record(where=where, image=image, source=source, prompt=item["prompt"])


def _caption_records(root: Path) -> list[Record]:
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    records = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            records.append(Record(where=str(image), problem=f"has no caption file {caption.name}"))
            continue
        try:
            prompt = caption.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            records.append(Record(where=str(caption), problem="is not UTF-8 text"))
            continue
        records.append(Record(where=str(image), image=image, prompt=prompt))
    return records


def training_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(height, width) an image of ``width`` x ``height`` trains at: its aspect ratio, about ``resolution``
    squared pixels, each side rounded to a multiple of ``multiple`` (at least one)."""
    scale = resolution / math.sqrt(width * height)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header; the file is checked as far as PIL can without
    decoding its pixels (``verify``). A ValueError says what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path} is not an image that can be read ({' '.join(str(e).split()) or type(e).__name__})") from None
    return size


def check_examples(records: list[Record], *, resolution: int, multiple: int, max_side: int | None,
                   prompt_length=None) -> list[Example]:
    """Every record checked (its images readable, its prompt text and not empty, its size within the model's, its
    sequence within the AR model's context by ``prompt_length(prompt, height, width, source_size)``), all of
    them before any fails: a DataError holds one line per bad record."""
    examples, problems = [], []
    for record in records:
        try:
            examples.append(_example(record, resolution, multiple, max_side, prompt_length))
        except ValueError as e:
            problems.append(f"{record.where}: {e}")
    if problems:
        raise DataError(problems)
    return examples


def _example(record: Record, resolution: int, multiple: int, max_side: int | None, prompt_length) -> Example:
    if record.problem:
        raise ValueError(record.problem)
    if not isinstance(record.prompt, str):
        raise ValueError(f"the prompt must be text, got {described(record.prompt)}")
    if not record.prompt.strip():
        raise ValueError("the prompt is empty")
    width, height = image_size(record.image)
    source_size = image_size(record.source) if record.source is not None else None
    h, w = training_size(width, height, resolution, multiple)
    try:
        check_size(h, w, multiple, max_side)
    except ValueError as e:
        raise ValueError(f"{record.image.name} ({width}x{height}) would train at {w}x{h}: {e}") from None
    if prompt_length is not None:
        prompt_length(record.prompt, h, w, source_size)
    return Example(where=record.where, image=record.image, prompt=record.prompt, height=h, width=w,
                   source=record.source, source_size=source_size)


class DataOrder:
    """The batches of a run: examples grouped by ``Example.bucket`` (one size per batch), each group's examples
    and then all the batches shuffled by a generator seeded with (seed, epoch) alone, so that batch ``n`` of the
    run is the same in a resumed run. A group's last batch may be smaller."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.groups: dict[tuple, list[int]] = {}
        for i, example in enumerate(examples):
            self.groups.setdefault(example.bucket, []).append(i)
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups.values())

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (0-based), as lists of example indices."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for group in self.groups.values():
            shuffled = [group[i] for i in rng.permutation(len(group))]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch(self, n: int) -> list[int]:
        """The run's batch ``n`` (0-based, counted over the epochs)."""
        return self.epoch(n // self.per_epoch)[n % self.per_epoch]
