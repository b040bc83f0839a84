"""Consumers of a run's events (events.py): the stage report and the progress bars."""

from __future__ import annotations

from .events import Event


class StageReport:
    """Per stage: compute seconds, model-loading seconds, MLX's peak memory; the AR tokens and DiT steps of the
    run. ``observe`` each event; ``log`` gets one line per finished stage."""

    def __init__(self, log=None):
        self.log = log or (lambda line: None)
        self.timings: dict[str, float] = {}
        self.load_seconds: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self.tokens = self.steps = 0
        self.blocks = [0, 0]  # DiT blocks computed, of all the steps' passes
        self.passes = [0, 0]  # DiT passes run, of those of guided steps

    def observe(self, event: Event):
        if event.kind == "token":
            self.tokens += event.count
        elif event.kind == "step":
            self.steps += 1
            if event.blocks is not None:
                self.blocks = [a + b for a, b in zip(self.blocks, event.blocks)]
            if event.passes is not None:
                self.passes = [a + b for a, b in zip(self.passes, event.passes)]
        elif event.kind == "stage" and event.done:
            self.timings[event.stage] = event.seconds
            self.load_seconds[event.stage] = event.load_seconds
            self.peaks[event.stage] = event.peak_memory
            self.log(self.line(event.stage))

    def line(self, stage: str) -> str:
        rate = ""
        if stage == "prior" and self.tokens:
            rate = f", {self.tokens / max(self.timings[stage], 1e-9):.1f} tokens/s"
        if stage == "denoise" and self.steps:
            rate = f", {self.timings[stage] / self.steps:.2f} s/step"
            run, planned = self.passes
            if planned and run < planned:
                rate += f", {run}/{planned} DiT passes run (guidance ends early)"
            computed, total = self.blocks
            if total and computed < total:
                rate += f", {computed}/{total} DiT blocks computed ({100 * computed / total:.0f}%)"
        return (f"{stage}: {self.timings[stage]:.1f} s{rate} (+ {self.load_seconds[stage]:.1f} s loading), "
                f"peak {self.peaks[stage] / 1e9:.2f} GB")

    @property
    def total_seconds(self) -> float:
        return sum(self.timings.values()) + sum(self.load_seconds.values())

    @property
    def peak_memory(self) -> int:
        return max(self.peaks.values(), default=0)


class ProgressBars:
    """A bar per request and stage (AR tokens, denoising steps), drawn from the events: the one place bars are made."""

    LABELS = {"token": ("prior tokens", "tok"), "step": ("denoising", "step")}

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def observe(self, event: Event):
        if not self.enabled or event.kind not in self.LABELS:
            return
        if event.index == 0:
            from tqdm import tqdm

            self.close()
            desc, unit = self.LABELS[event.kind]
            self.bar = tqdm(total=event.total * event.count, desc=desc, unit=unit)
        if self.bar is not None:
            self.bar.update(event.count)
            if event.index + 1 >= event.total:
                self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
