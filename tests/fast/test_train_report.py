"""A training run's progress line (mlx_glm_image.train.report.Progress) with a fake clock, to a log stream and to a
fake terminal, and its loss log and loss picture (LossLog), against hand-computed values."""

import io
import json
import math
import sys

import numpy as np
from PIL import Image

from mlx_glm_image.train.report import COLOURS, LOG_NAME, MARGINS, SIZE, LossLog, Progress, Smoothed

GB = 10**9


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def progress(stream, clock, **kw):
    return Progress(total=kw.pop("total", 1000), stream=stream, clock=clock, **kw)


def step(bar, clock, n, at, loss=2.0, amount=100, **kw):
    clock.now = at
    bar.update(n, loss=loss, learning_rate=1.2e-5, amount=amount, peak_bytes=3_200_000_000, **kw)


def test_smoothing_is_tensorboards_bias_corrected_average_without_non_finite_values():
    smoothed = Smoothed(0.9)
    assert math.isnan(smoothed.value)
    assert smoothed.add(2.0) == 2.0  # 0.2 / (1 - 0.9)
    assert math.isclose(smoothed.add(1.0), 0.28 / 0.19)  # (0.9 * 0.2 + 0.1 * 1.0) / (1 - 0.81)
    assert math.isclose(smoothed.add(math.nan), 0.28 / 0.19)
    assert math.isclose(smoothed.add(3.0), 0.552 / 0.271)  # 0.9 * 0.28 + 0.3, over 1 - 0.9**3


def test_the_line_has_the_smoothed_loss_the_rate_and_the_eta_of_the_steps_after_the_first():
    clock, out = Clock(), io.StringIO()
    bar = progress(out, clock, every=0.0)
    step(bar, clock, 1, at=5.0, loss=2.0, amount=300)  # its own time is unknown: no rate yet
    step(bar, clock, 2, at=7.0, loss=1.0, amount=630)  # 630 tokens in 2 s; 998 steps of 2 s left
    assert out.getvalue().splitlines() == [
        "step 1/1000  loss 2.0000 (smoothed 2.0000)  lr 1.2e-05  -- tok/s  peak 3.2 GB  ETA --",
        # smoothed: (0.9 * 0.2 + 0.1 * 1.0) / (1 - 0.9**2)
        "step 2/1000  loss 1.0000 (smoothed 1.4737)  lr 1.2e-05  315 tok/s  peak 3.2 GB  ETA 0:33:16",
    ]


def test_a_skipped_step_shows_its_loss_keeps_the_smoothed_one_and_is_counted():
    clock, out = Clock(), io.StringIO()
    bar = progress(out, clock, every=0.0)
    step(bar, clock, 1, at=5.0, loss=2.0, amount=300)
    step(bar, clock, 2, at=7.0, loss=1.0, amount=630)
    step(bar, clock, 3, at=17.0, loss=math.nan, amount=906, skipped=1)  # 1536 in 12 s; 997 steps of 6 s left
    assert out.getvalue().splitlines()[-1] == (
        "step 3/1000  loss nan (smoothed 1.4737)  lr 1.2e-05  128 tok/s  peak 3.2 GB  ETA 1:39:42  skipped 1")


def test_a_log_stream_gets_a_line_every_so_often_and_always_the_first_and_the_last():
    clock, out = Clock(), io.StringIO()
    bar = progress(out, clock, total=30, every=10.0)
    for n in range(1, 31):
        step(bar, clock, n, at=n - 1.0)
    printed = [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()]
    assert printed == [1, 11, 21, 30]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert out.getvalue().splitlines()[-1].endswith("ETA 0:00:00")


def test_a_terminal_line_is_rewritten_in_place_and_a_message_clears_it_until_the_next_update():
    clock, out = Clock(), Terminal()
    bar = progress(out, clock, total=3)
    lines = []
    for n in (1, 2):
        step(bar, clock, n, at=float(n))
        lines.append(out.getvalue().rsplit("\r", 1)[1].removesuffix("\x1b[K"))
    assert out.getvalue() == f"\r{lines[0]}\x1b[K\r{lines[1]}\x1b[K"
    bar.message("checkpoint written to out/0000002")
    assert out.getvalue().endswith(f"\r{lines[1]}\x1b[K\r\x1b[Kcheckpoint written to out/0000002\n")
    before = len(out.getvalue())
    step(bar, clock, 3, at=3.0)
    redrawn = out.getvalue()[before:]
    assert redrawn.startswith("\rstep 3/3  ") and redrawn.endswith("\x1b[K")
    bar.close()
    bar.close()  # once ended, nothing more
    assert out.getvalue() == out.getvalue()[:before] + redrawn + "\n"


def test_a_message_or_a_close_on_a_log_stream_adds_nothing_but_the_message():
    clock, out = Clock(), io.StringIO()
    bar = progress(out, clock, total=3)
    step(bar, clock, 1, at=0.0)
    bar.message("checkpoint written")
    bar.close()
    assert out.getvalue().splitlines()[1:] == ["checkpoint written"]


def test_a_resumed_run_counts_its_rate_and_eta_from_its_own_steps():
    clock, out = Clock(), io.StringIO()
    bar = progress(out, clock, total=100, start=10, unit="img", every=0.0)
    clock.now = 1000.0  # time spent before its first step (loading) counts for nothing
    step(bar, clock, 11, at=1000.0)
    step(bar, clock, 12, at=1004.0)
    step(bar, clock, 13, at=1008.0)  # 200 images in 8 s; 87 steps of 4 s left
    assert out.getvalue().splitlines()[-1].endswith("  25.0 img/s  peak 3.2 GB  ETA 0:05:48")
    assert out.getvalue().splitlines()[0].startswith("step 11/100  ")


def test_the_default_stream_is_sys_stderr_at_the_time_of_writing(monkeypatch):
    clock, err = Clock(), io.StringIO()
    bar = Progress(total=2, clock=clock)
    monkeypatch.setattr(sys, "stderr", err)
    step(bar, clock, 1, at=0.0)
    assert err.getvalue().startswith("step 1/2  ")


def test_records_are_appended_and_read_back(tmp_path):
    log = LossLog(tmp_path)
    log.record(1, loss=2.5, learning_rate=1e-4, grad_norm=0.75)
    log.record(2, loss=math.nan, learning_rate=1e-4)
    log.record(2, validation_loss=2.25)
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.75}
    records = log.records
    assert len(lines) == len(records) == 3
    assert records[0] == {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.75}
    assert math.isnan(records[1]["loss"]) and records[2] == {"step": 2, "validation_loss": 2.25}


def test_a_resumed_log_keeps_the_steps_up_to_the_resumed_one_and_goes_on_after_them(tmp_path):
    log = LossLog(tmp_path)
    for n in range(1, 6):
        log.record(n, loss=float(n))
    log.record(3, validation_loss=0.5)
    with open(tmp_path / LOG_NAME, "a") as f:
        f.write('{"step": 6, "lo')  # cut short by a kill
    resumed = LossLog(tmp_path, resume_step=3)
    assert resumed.records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
                               {"step": 3, "validation_loss": 0.5}]
    resumed.record(4, loss=40.0)
    assert [r["step"] for r in resumed.records] == [1, 2, 3, 3, 4] and resumed.records[-1]["loss"] == 40.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOG_NAME]  # no temporary left


def test_a_new_log_replaces_an_old_one(tmp_path):
    LossLog(tmp_path).record(1, loss=1.0)
    log = LossLog(tmp_path)
    assert log.records == [] and (tmp_path / LOG_NAME).read_text() == ""
    log.record(1, loss=2.0)
    assert log.records == [{"step": 1, "loss": 2.0}]


def colour_pixels(image: Image.Image, colour) -> np.ndarray:
    """(y, x) of the pixels of ``colour`` in the left half of the picture (the legend is at the right)."""
    pixels = np.asarray(image.convert("RGB"))[:, : SIZE[0] // 2]
    return np.argwhere((pixels == colour).all(-1))


def test_the_loss_picture_has_the_curves_and_the_validation_markers(tmp_path):
    log = LossLog(tmp_path)
    for n in range(1, 201):
        log.record(n, loss=3.0 * math.exp(-n / 40) + 0.5 + 0.2 * (n % 2))  # falling, zigzag
    log.record(10, validation_loss=2.5)
    log.plot(tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as image:
        assert image.format == "PNG" and image.size == SIZE
        image.load()
    for name in ("loss", "smoothed", "validation_loss"):
        assert len(colour_pixels(image, COLOURS[name])), name
    # the loss falls: the smoothed curve is higher up (smaller y) at the start than at the middle
    smoothed = colour_pixels(image, COLOURS["smoothed"])
    start, middle = smoothed[smoothed[:, 1] < 120], smoothed[smoothed[:, 1] > 300]
    assert start[:, 0].mean() < middle[:, 0].mean() - 100


def test_non_finite_losses_are_left_out_of_the_picture(tmp_path):
    log = LossLog(tmp_path)
    for n, loss in enumerate([3.0, math.nan, 2.5, math.inf, 2.0, 1.5], start=1):
        log.record(n, loss=loss)
    log.plot(tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as image:
        assert image.size == SIZE
        assert len(colour_pixels(image, COLOURS["smoothed"]))


def test_a_log_with_fewer_than_two_points_still_gives_a_picture(tmp_path):
    log = LossLog(tmp_path)
    log.plot(tmp_path / "empty.png")
    log.record(1, loss=2.0)
    log.plot(tmp_path / "one.png")
    with Image.open(tmp_path / "empty.png") as empty, Image.open(tmp_path / "one.png") as one:
        assert empty.size == one.size == SIZE
        assert not len(colour_pixels(empty, COLOURS["smoothed"]))
        # the one value is a dot amid the frame (its axes are a unit around it)
        left, top, right, bottom = MARGINS
        assert one.convert("RGB").getpixel(((left + SIZE[0] - right) // 2, (top + SIZE[1] - bottom) // 2)) \
            == COLOURS["smoothed"]
