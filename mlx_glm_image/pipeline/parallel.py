"""Several processes on one run, with MLX's distributed runtime (started by ``mlx.launch``, ring or MPI backend).

``cfg`` (2 ranks): classifier-free guidance split in two. Rank 0 runs the AR model, the conditional DiT passes
(with the condition images' KV cache), the VAE and writes the image; rank 1 runs the unconditional passes. The
prior tokens are broadcast once; each step exchanges one latent-sized velocity (an all-gather). ``data`` (any
size): the run's images are divided over the ranks, each writes its own.

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


class Parallel:
    def __init__(self, mode: str, group, timeout: float = 600.0):
        self.mode, self.group, self.timeout = mode, group, timeout
        self.rank, self.size = group.rank(), group.size()

    @classmethod
    def join(cls, mode: str | None, timeout: float = 600.0) -> "Parallel | None":
        """This process's place in the group ``mlx.launch`` started; checks that the group fits ``mode``."""
        if mode is None:
            return None
        if mode not in MODES:
            raise ValueError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
        group = mx.distributed.init()
        if group.size() < 2:
            raise ValueError("--parallel needs several processes: run it under mlx.launch (e.g. mlx.launch -n 2 "
                             "--backend ring -- mlx-glm-image ... --parallel cfg)")
        if mode == "cfg" and group.size() != 2:
            raise ValueError(f"--parallel cfg splits guidance over exactly 2 processes, got {group.size()}")
        return cls(mode, group, timeout)

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

    def guided(self, v: mx.array) -> tuple[mx.array, mx.array]:
        """(conditional, unconditional) velocities: rank 0 gives the first, rank 1 the second (one all-gather)."""
        both = mx.distributed.all_gather(v, group=self.group)
        return both[: v.shape[0]], both[v.shape[0]:]

    def barrier(self):
        self.evaluate(mx.distributed.all_sum(mx.array([1.0]), group=self.group), what="the end of the run")
