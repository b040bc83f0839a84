"""Where a run's work goes: one process, or several under ``mlx.launch`` with MLX's distributed runtime (ring or
MPI backend). A placement is one strategy object the stages ask, instead of checking a mode in each of them.

- ``Single``: everything here.
- ``GuidanceSplit`` (``cfg``, 2 ranks): classifier-free guidance split in two. Rank 0 runs the AR model, the
  conditional DiT passes (with the condition images' KV cache), the VAE and writes the image; rank 1 runs the
  unconditional passes. The prior tokens are broadcast once; each step exchanges one latent-sized velocity (an
  all-gather).
- ``DataSplit`` (``data``, any size): the run's requests divided over the ranks; each writes its own images.

Every exchange runs under a watchdog: a rank that waits longer than ``timeout`` seconds for its peers (one of
them died) stops with a one-line error instead of hanging.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

import mlx.core as mx

MODES = ("cfg", "data")


class Single:
    """One process does everything."""

    mode = None
    rank, size = 0, 1
    leader = True  # reports, and decides what is random
    runs_prior = True  # runs the AR model (else it receives the prior tokens)
    decodes = True  # encodes condition images, decodes and writes images

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def picks(self, n: int) -> range:
        """The requests of a run of ``n`` that this process generates."""
        return range(n)

    def check(self, request):
        """Refuse a request this placement cannot run (a ValueError)."""

    def share(self, prior_token_ids: mx.array) -> mx.array:
        """The prior tokens every process denoises with."""
        return prior_token_ids

    def my_passes(self, passes: list) -> list:
        """The DiT passes of each step (conditional, unconditional) that run here."""
        return passes

    def gather(self, velocities: dict) -> dict:
        """Every pass's velocity, from the ones computed here (name -> array)."""
        return velocities

    def evaluate(self, *arrays, what: str = "the denoising step"):
        mx.eval(*arrays)

    def barrier(self):
        """Wait until every process is here."""


class Distributed(Single):
    """Several processes in the group ``mlx.launch`` started."""

    def __init__(self, group, timeout: float = 600.0):
        self.group, self.timeout = group, timeout
        self.rank, self.size = group.rank(), group.size()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @contextmanager
    def watchdog(self, what: str):
        """Stop this process with one line if ``what`` (an exchange with the other ranks) takes too long."""

        def expire():
            print(f"error: rank {self.rank}: no answer from the other processes for {self.timeout:.0f} s during "
                  f"{what}; one of them stopped", file=sys.stderr, flush=True)
            os._exit(1)

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def evaluate(self, *arrays, what: str = "the denoising step"):
        with self.watchdog(what):
            mx.eval(*arrays)

    def broadcast(self, x: mx.array) -> mx.array:
        """Rank 0's ``x`` on every rank (the others pass an array of the same shape and dtype)."""
        x = mx.distributed.all_sum(x if self.leader else mx.zeros_like(x), group=self.group)
        self.evaluate(x, what="the broadcast of rank 0's results")
        return x

    def barrier(self):
        self.evaluate(mx.distributed.all_sum(mx.array([1.0]), group=self.group), what="the end of the run")


class GuidanceSplit(Distributed):
    mode = "cfg"

    @property
    def runs_prior(self) -> bool:
        return self.leader

    @property
    def decodes(self) -> bool:
        return self.leader

    def check(self, request):
        if not request.schedule.guided:
            raise ValueError(f"--parallel cfg splits guidance: it needs guidance > 1, got {request.schedule.guidance_scale}")

    def share(self, prior_token_ids: mx.array) -> mx.array:
        return self.broadcast(prior_token_ids)

    def my_passes(self, passes: list) -> list:
        return [passes[self.rank]]

    def gather(self, velocities: dict) -> dict:
        """Rank 0 gives the conditional velocity, rank 1 the unconditional one (one all-gather)."""
        (v,) = velocities.values()
        both = mx.distributed.all_gather(v, group=self.group)
        return {"cond": both[: v.shape[0]], "uncond": both[v.shape[0]:]}


class DataSplit(Distributed):
    mode = "data"

    def picks(self, n: int) -> range:
        return range(self.rank, n, self.size)


def join(mode: str | None, timeout: float = 600.0) -> Single:
    """This process's placement: ``Single`` without a mode, else its place in the group ``mlx.launch`` started
    (checked to fit the mode)."""
    if mode is None:
        return Single()
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
    group = mx.distributed.init()
    if group.size() < 2:
        raise ValueError("--parallel needs several processes: run it under mlx.launch (e.g. mlx.launch -n 2 "
                         "--backend ring -- mlx-glm-image ... --parallel cfg)")
    if mode == "cfg" and group.size() != 2:
        raise ValueError(f"--parallel cfg splits guidance over exactly 2 processes, got {group.size()}")
    return (GuidanceSplit if mode == "cfg" else DataSplit)(group, timeout)
