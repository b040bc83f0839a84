"""What a training run shows and keeps: ``Progress``, its one status line (rewritten in place on a terminal, printed
now and then to a log file or a pipe), and ``LossLog``, the run's ``loss.jsonl`` and the picture of its loss curve.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .. import atomic
from ..conversion import human

LOG_NAME = "loss.jsonl"
SIZE = (800, 480)  # the loss picture, pixels
MARGINS = (72, 28, 24, 48)  # left, top, right, bottom: room for the tick labels and the axis names
COLOURS = {"loss": (158, 202, 225), "smoothed": (33, 113, 181), "validation_loss": (214, 39, 40)}
LABELS = {"loss": "loss", "smoothed": "smoothed loss", "validation_loss": "validation loss"}
GRID = (230, 230, 230)
INK = (60, 60, 60)
CLEAR_LINE = "\x1b[K"


class Smoothed:
    """TensorBoard's smoothing: an exponential moving average started at 0 and divided by ``1 - smoothing**n``
    (the weight its ``n`` values have so far), so the first values are not pulled towards 0: the first value is
    itself. Non-finite values (a skipped step's loss) are left out. ``value`` is NaN before any finite value."""

    def __init__(self, smoothing: float = 0.9):
        self.smoothing = smoothing
        self.average = 0.0
        self.count = 0

    def add(self, value: float) -> float:
        if math.isfinite(value):
            self.count += 1
            self.average = self.smoothing * self.average + (1 - self.smoothing) * value
        return self.value

    @property
    def value(self) -> float:
        return self.average / (1 - self.smoothing ** self.count) if self.count else math.nan


class Progress:
    """The progress line of a run of ``total`` optimizer steps, resumed after step ``start``:

        step 12/1000  loss 2.3456 (smoothed 2.4012)  lr 1.2e-05  315 tok/s  peak 3.2 GB  ETA 1:02:03

    The loss is smoothed as ``Smoothed`` does (TensorBoard's bias-corrected average). The rate and the ETA count
    this process's steps from its first update on (the first step's own time, compilation included, is not known,
    so it is left out): until a second update they read ``--``. On a terminal the line is rewritten at every update;
    elsewhere a line is printed at most every ``every`` seconds of ``clock``, and always for this process's first
    step and the last one. ``stream`` defaults to sys.stderr as it is at each write."""

    def __init__(self, *, total: int, start: int = 0, unit: str = "tok", stream=None, clock=time.monotonic,
                 every: float = 10.0, smoothing: float = 0.9):
        self.total = total
        self.start = start
        self.unit = unit
        self._stream = stream
        self.clock = clock
        self.every = every
        self.loss = Smoothed(smoothing)
        self._first = None  # (step, time) of this process's first update
        self._amount = 0  # processed by the steps after the first
        self._printed_at = None  # when a full line was last printed (not a terminal)
        self._open = False  # an in-place line is on the terminal, not ended by a newline

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    def update(self, step: int, *, loss: float, learning_rate: float, amount: int, peak_bytes: int,
               skipped: int = 0):
        """After optimizer step ``step``, which processed ``amount`` tokens or images."""
        now = self.clock()
        smoothed = self.loss.add(loss)
        if self._first is None:
            self._first = (step, now)
        else:
            self._amount += amount
        line = self._format(step, loss=loss, smoothed=smoothed, learning_rate=learning_rate, now=now,
                         peak_bytes=peak_bytes, skipped=skipped)
        stream = self.stream
        if _isatty(stream):
            width = _columns(stream)
            self._write(f"\r{line[:width - 1] if width else line}{CLEAR_LINE}")  # a wrapped line cannot be rewritten
            self._open = True
        elif step == self._first[0] or step >= self.total or now - self._printed_at >= self.every:
            self._write(line + "\n")
            self._printed_at = now

    def _format(self, step: int, *, loss: float, smoothed: float, learning_rate: float, now: float, peak_bytes: int,
             skipped: int = 0) -> str:
        rate, eta = self._rate_and_eta(step, now)
        parts = [f"step {step}/{self.total}", f"loss {loss:.4f} (smoothed {smoothed:.4f})", f"lr {learning_rate:.1e}",
                 f"{_rate(rate)} {self.unit}/s", f"peak {human(peak_bytes)}", f"ETA {_duration(eta)}"]
        if skipped:
            parts.append(f"skipped {skipped}")
        return "  ".join(parts)

    def message(self, text: str):
        """A line of its own (e.g. a checkpoint written); an in-place line is cleared first and redrawn at the
        next update."""
        self._write(("\r" + CLEAR_LINE if self._open else "") + text + "\n")
        self._open = False

    def close(self):
        """Ends an in-place line with a newline, so that what follows starts on a line of its own."""
        if self._open:
            self._write("\n")
            self._open = False

    def _rate_and_eta(self, step: int, now: float) -> tuple[float | None, float | None]:
        """``amount`` per second over this process's steps after its first, and the seconds left at that pace."""
        first_step, first_time = self._first
        elapsed = now - first_time
        if step <= first_step or elapsed <= 0:
            return None, (0.0 if step >= self.total else None)
        seconds_per_step = elapsed / (step - first_step)
        return self._amount / elapsed, max(self.total - step, 0) * seconds_per_step

    def _write(self, text: str):
        stream = self.stream
        stream.write(text)
        stream.flush()


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _columns(stream) -> int | None:
    """The terminal's width, or None where the stream has no terminal behind a file descriptor."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def _rate(rate: float | None) -> str:
    """Whole units from 100 on, else enough decimals to tell a slow rate (0.35 img/s) from none."""
    if rate is None:
        return "--"
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class LossLog:
    """The run's log, ``loss.jsonl`` in ``folder``: one JSON object a line, ``{"step": ..., **values}``. A new log
    replaces an old file; with ``resume_step`` the records of steps up to it are kept (rewritten atomically) and the
    run's log goes on after them as if it had never stopped. A skipped step's NaN loss is written as ``NaN``, which
    Python's json reads back. A line that does not parse (cut short when a run was killed) is left out."""

    def __init__(self, folder: Path, *, resume_step: int | None = None, smoothing: float = 0.9):
        self.path = Path(folder) / LOG_NAME
        self.smoothing = smoothing
        kept = [] if resume_step is None else [r for r in self.records if r["step"] <= resume_step]
        with atomic.replacing(self.path) as tmp:
            tmp.write_text("".join(_line(r) for r in kept))

    def record(self, step: int, **values):
        """Appends ``{"step": step, **values}`` as one line; it is on disk when this returns."""
        with open(self.path, "a") as f:
            f.write(_line({"step": step, **values}))

    @property
    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [r for r in map(_parse, self.path.read_text().splitlines()) if r is not None]

    def plot(self, path: Path):
        """Writes the loss curve as a PNG (``SIZE``): the training loss per step (thin), its smoothed curve
        (thick), ``validation_loss`` as markers, non-finite values left out. A picture is always written: with
        no finite value its axes are empty, with one value it is a dot."""
        records = self.records
        train = _points(records, "loss")
        smoothed = Smoothed(self.smoothing)
        series = {"loss": train, "smoothed": [(s, smoothed.add(v)) for s, v in train],
                  "validation_loss": _points(records, "validation_loss")}
        image = _draw({name: points for name, points in series.items() if points})
        with atomic.replacing(path) as tmp:
            image.save(tmp, format="PNG")  # the temporary's name has no .png to go by


def _line(record: dict) -> str:
    return json.dumps(record) + "\n"


def _parse(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def _points(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


class _Frame:
    """Maps (step, loss) to pixels inside the margins."""

    def __init__(self, xs: tuple[float, float], ys: tuple[float, float]):
        self.xs, self.ys = xs, ys
        left, top, right, bottom = MARGINS
        self.box = (left, top, SIZE[0] - right, SIZE[1] - bottom)

    def x(self, value: float) -> float:
        (lo, hi), (left, _, right, _) = self.xs, self.box
        return left + (value - lo) / (hi - lo) * (right - left)

    def y(self, value: float) -> float:
        (lo, hi), (_, top, _, bottom) = self.ys, self.box
        return bottom - (value - lo) / (hi - lo) * (bottom - top)


def _draw(series: dict[str, list[tuple[float, float]]]) -> Image.Image:
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    points = [p for name in ("loss", "validation_loss") for p in series.get(name, [])]
    frame = _Frame(_span([s for s, _ in points], pad=0.0), _span([v for _, v in points], pad=0.05))
    _axes(draw, font, frame)
    for name, width in (("loss", 1), ("smoothed", 3)):
        _curve(draw, frame, series.get(name, []), COLOURS[name], width)
    for step, value in series.get("validation_loss", []):
        _marker(draw, (frame.x(step), frame.y(value)), COLOURS["validation_loss"])
    _legend(draw, font, frame, list(series))
    return image


def _span(values: list[float], pad: float) -> tuple[float, float]:
    """The axis range: the values' own, widened by ``pad`` of it on both sides; a unit around a single value."""
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    if hi == lo:
        return lo - 1, hi + 1
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> tuple[list[float], int]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) in [lo, hi], and the decimals they need."""
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if whole:
        step = max(step, 1)
    first = math.ceil(lo / step) * step
    ticks = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    return ticks, max(0, -math.floor(math.log10(step)))


def _axes(draw: ImageDraw.ImageDraw, font, frame: _Frame):
    left, top, right, bottom = frame.box
    xticks, xdecimals = _ticks(*frame.xs, whole=True)
    for tick in xticks:
        x = frame.x(tick)
        draw.line([(x, top), (x, bottom)], fill=GRID)
        _text(draw, (x, bottom + 6), f"{tick:.{xdecimals}f}", font, "ma")
    yticks, ydecimals = _ticks(*frame.ys)
    for tick in yticks:
        y = frame.y(tick)
        draw.line([(left, y), (right, y)], fill=GRID)
        _text(draw, (left - 6, y), f"{tick:.{ydecimals}f}", font, "rm")
    draw.rectangle(frame.box, outline=INK)
    _text(draw, ((left + right) / 2, SIZE[1] - 8), "step", font, "md")
    _text(draw, (8, 8), "loss", font, "la")


def _curve(draw: ImageDraw.ImageDraw, frame: _Frame, points: list[tuple[float, float]], colour, width: int):
    pixels = [(frame.x(s), frame.y(v)) for s, v in points]
    if len(pixels) == 1:
        _marker(draw, pixels[0], colour, radius=width + 1)
    elif pixels:
        draw.line(pixels, fill=colour, width=width, joint="curve" if width > 1 else None)


def _marker(draw: ImageDraw.ImageDraw, centre: tuple[float, float], colour, radius: int = 4):
    x, y = centre
    draw.ellipse([(x - radius, y - radius), (x + radius, y + radius)], fill=colour)


def _legend(draw: ImageDraw.ImageDraw, font, frame: _Frame, names: list[str]):
    """The series shown, in a box in the frame's top right corner."""
    if not names:
        return
    row, swatch = 18, 24
    width = swatch + 14 + max(draw.textlength(LABELS[n], font=font) for n in names)
    _, top, right, _ = frame.box
    box = (right - 10 - width, top + 10, right - 10, top + 10 + row * len(names) + 6)
    draw.rectangle(box, fill="white", outline=GRID)
    for i, name in enumerate(names):
        x, y = box[0] + 6, box[1] + 3 + row * i + row / 2
        if name == "validation_loss":
            _marker(draw, (x + swatch / 2, y), COLOURS[name])
        else:
            draw.line([(x, y), (x + swatch, y)], fill=COLOURS[name], width=1 if name == "loss" else 3)
        _text(draw, (x + swatch + 8, y), LABELS[name], font, "lm")


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, anchor: str):
    """``text`` placed by ``anchor`` as Pillow's (l/m/r across, a/m/d down), also with the bitmap font Pillow falls
    back to without FreeType, which takes no anchor."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    across = {"l": left, "m": (left + right) / 2, "r": right}[anchor[0]]
    down = {"a": top, "m": (top + bottom) / 2, "d": bottom}[anchor[1]]
    draw.text((xy[0] - across, xy[1] - down), text, fill=INK, font=font)
