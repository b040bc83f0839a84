"""Where a run's work goes: one process, or several under ``mlx.launch`` with MLX's distributed runtime (ring or
MPI backend). A placement is one strategy object the stages ask, instead of checking a mode in each of them.

- ``Single``: everything here.
- ``GuidanceSplit`` (``cfg``, 2 ranks): classifier-free guidance split in two. Rank 0 runs the AR model, the
  conditional DiT passes (with the condition images' KV cache), the VAE and writes the image; rank 1 runs the
  unconditional passes. The prior tokens are broadcast once; each step exchanges one latent-sized velocity (an
  all-gather).
- ``DataSplit`` (``data``, any size): the run's requests divided over the ranks; each writes its own images.
- ``TensorSplit`` (``tensor``, N ranks): every rank holds and computes a 1/N share of the DiT's blocks and of the
  AR text model (sharding.py); all ranks run every stage in step (one all-reduce per split layer), rank 0
  decodes and writes the image.
- ``GuidanceTensorSplit`` (``cfg,tensor``, 2N ranks): ranks 0..N-1 run the conditional passes, N..2N-1 the
  unconditional ones, each group tensor-split N ways; one velocity exchange a step, as ``cfg``.

Every exchange runs under a watchdog: a rank that waits longer than ``timeout`` seconds for its peers (one of
them died) stops with a one-line error instead of hanging.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

import mlx.core as mx

from .. import loading, sharding
from .. import quantize as Q
from ..sharding import Split
from .components import MODELS

MODES = ("cfg", "data", "tensor", "cfg,tensor")


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

    reads_conditions = True  # writes the condition images' KV cache (runs a conditional pass, or in step with one)
    splits: dict = {}  # model name -> this rank's tensor split of it (sharding.Split)

    def check_models(self, components):
        """Refuse (a ValueError, the same line on every rank) a split that the models cannot take, from their
        configs alone: called as soon as the group is formed, before the ranks exchange anything, so that a
        refusal never leaves another rank waiting in an exchange."""

    def align(self, inputs, image_tokens: int):
        """Before a run's DiT passes (their inputs: denoise.DenoiseInputs; ``image_tokens`` per image)."""

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

    def record(self) -> dict | None:
        """Where an image was made, for its metadata ("parallel"): None for one process, else the mode and the
        number of processes (a tensor split rounds differently from one process: ``rounding_warning``)."""
        return {"mode": self.mode, "ranks": self.size} if self.distributed else None


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

    @property
    def reads_conditions(self) -> bool:
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


class TensorSplit(Distributed):
    """Each model's matmul layers split over ranks that run every stage together (sharding.py)."""

    mode = "tensor"

    def __init__(self, group, timeout: float = 600.0):
        super().__init__(group, timeout)
        whole = Split(group, size=self.size, rank=self.rank)
        self.splits = {"vision_language_encoder": whole, "transformer": whole}

    @property
    def decodes(self) -> bool:
        return self.leader

    def check_models(self, components):
        """Every rank's share of each split model: the sizes and heads its plan divides, and the quantization
        groups of its input shares (a converted folder's stored quantization, or load-time ``-q``)."""
        for name, split in self.splits.items():
            config = components.config(name)  # also checks a stored quantization block (its modes, group sizes)
            plans = [MODELS[name].tensor_plan(config, split.size, rank) for rank in range(split.size)]
            quantized = _quantized_layers(components, name, [share.path for share in plans[0]])
            for plan in plans:
                sharding.check_groups(plan, quantized)

    def share(self, prior_token_ids: mx.array) -> mx.array:
        # every rank sampled the same tokens from the same all-reduced logits; rank 0's are the record
        return self.broadcast(prior_token_ids)


class GuidanceTensorSplit(TensorSplit, GuidanceSplit):
    """``cfg,tensor``: two guidance groups of N ranks each, each group tensor-splitting the DiT; the ring backend has
    no sub-groups, so a group's all-reduce runs over every rank in its own slot (sharding.Split). The AR model,
    which runs once for both passes, is split over all 2N ranks."""

    mode = "cfg,tensor"

    def __init__(self, group, timeout: float = 600.0):
        super().__init__(group, timeout)
        n = self.size // 2
        self.splits["transformer"] = Split(group, size=n, rank=self.rank % n, slot=self.rank // n, slots=2)

    runs_prior = True  # every rank holds a share of the AR model
    reads_conditions = True  # the unconditional group writes the condition cache too: its all-reduces meet the other's

    def check(self, request):
        GuidanceSplit.check(self, request)
        if request.cache_config is not None:
            raise ValueError("--parallel cfg,tensor cannot take the step cache: the two guidance groups would skip "
                             "different blocks, and their exchanges must meet; use --parallel cfg or tensor")

    def align(self, inputs, image_tokens: int):
        """The two groups' all-reduces meet at the longer of the two passes' sequences."""
        texts = [e.shape[1] for e in (inputs.prompt_embeds, inputs.negative_prompt_embeds) if e is not None]
        self.splits["transformer"].rows = max(texts) + image_tokens

    def my_passes(self, passes: list) -> list:
        return [passes[self.splits["transformer"].slot]]

    def gather(self, velocities: dict) -> dict:
        """Each group's first rank gives its pass's velocity (one all-gather over every rank)."""
        (v,) = velocities.values()
        every = mx.distributed.all_gather(v, group=self.group)
        b = v.shape[0]
        n = self.splits["transformer"].size
        return {"cond": every[:b], "uncond": every[n * b:(n + 1) * b]}


def _quantized_layers(components, name: str, paths: list[str]) -> dict[str, tuple[int, int]]:
    """Which of model ``name``'s layers ``paths`` will run quantized, with their (group size, bits), from the
    configs: as a converted folder's quantization block says, or as a load-time quantization picks them on the
    whole model (the loader's rule, on a model built from config.json: nothing is read)."""
    spec = components.quantization().get(name)  # the folder's or load-time's, None when it runs unquantized
    if spec is None:
        return {}
    block = loading.read_config(components.folder(name, files="*.json")).get("quantization")
    if block:
        specs = {path: Q.stored_spec(block, path) for path in paths}
    else:
        spec = Q.as_spec(spec)
        chosen = Q.quantizable_layers(components.skeleton(name), spec.group_size)[0]
        specs = {path: spec for path in paths if path in chosen}
    return {path: (s.group_size, s.bits) for path, s in specs.items() if s is not None}


class DataSplit(Distributed):
    mode = "data"

    def picks(self, n: int) -> range:
        return range(self.rank, n, self.size)


def rounding_warning(recorded: dict | None, placement: Single) -> str | None:
    """What to say when an image made under the ``recorded`` placement (its metadata's "parallel") is made again
    under ``placement``, if that may change it: a tensor split on either side, unless both are the same split (it
    sums its partial results in another order than one process; cfg and data splits give one process's bits)."""
    mine = placement.record()
    if recorded == mine or not any(p is not None and "tensor" in p["mode"] for p in (recorded, mine)):
        return None
    return (f"it was made {_where(recorded)} and this run is {_where(mine)}: a tensor split rounds differently, so "
            "the image may differ (slightly in float32, visibly in bfloat16: docs/parallel.md)")


def _where(record: dict | None) -> str:
    return "in one process" if record is None else f"with --parallel {record['mode']} on {record['ranks']} processes"


def join(mode: str | None, timeout: float = 600.0) -> Single:
    """This process's placement: ``Single`` without a mode, else its place in the group ``mlx.launch`` started
    (checked to fit the mode)."""
    if mode is None:
        return Single()
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
    group = mx.distributed.init()
    if group.size() < 2:
        raise ValueError(f"--parallel needs several processes: run it under mlx.launch (e.g. mlx.launch -n 2 "
                         f"--backend ring -- mlx-glm-image ... --parallel {mode})")
    if mode == "cfg" and group.size() != 2:
        raise ValueError(f"--parallel cfg splits guidance over exactly 2 processes, got {group.size()}")
    if mode == "cfg,tensor" and (group.size() < 4 or group.size() % 2):
        raise ValueError(f"--parallel cfg,tensor needs 2N processes (two guidance groups of N >= 2), got {group.size()}")
    placements = {"cfg": GuidanceSplit, "data": DataSplit, "tensor": TensorSplit, "cfg,tensor": GuidanceTensorSplit}
    return placements[mode](group, timeout)
