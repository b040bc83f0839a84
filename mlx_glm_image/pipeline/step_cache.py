"""The step cache: at a step where the DiT's middle blocks would barely change their input, skip them and add
what they added last time. It decides exactly as cache-dit's DBCache does on GLM-Image (cache-dit 1.5.3,
``cache_dit/caching``: ``cache_blocks/pattern_base.py``, ``cache_contexts/cache_manager.py``, ``cache_context.py``,
``calibrators/taylorseer.py``), with its names and defaults, so that its published settings mean the same here.

Each DiT pass of a step (one ``Pass`` of the Stepper) runs its first ``Fn_compute_blocks`` blocks, then compares
the residual they added to the image tokens with the one of the last step it computed in full: the relative L1
``mean|prev - now| / mean|prev|``. Past ``max_warmup_steps`` (every ``warmup_interval``-th of them computed), within
``max_cached_steps`` and ``max_continuous_cached_steps``, and while that diff is under ``residual_diff_threshold``,
the middle blocks are skipped and their last residual (text and image tokens) is added instead, extrapolated from
the computed steps by a Taylor series with ``TaylorSeerCalibratorConfig``; the last ``Bn_compute_blocks`` blocks
always run. The conditional and the unconditional passes keep separate caches (``enable_separate_cfg``).

A decision needs the diff on the host: one read per pass and step. The policy yields that lazy scalar to the
Stepper, which queues the next pass's first blocks before the read, so the device is not left idle while it waits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import mlx.core as mx

from . import checks

MAX_ORDER = 8  # TaylorSeer's extrapolation order: cache-dit uses 1 or 2; high orders extrapolate noise


@dataclass(frozen=True, kw_only=True)
class DBCacheConfig:
    """cache-dit's DBCacheConfig fields (and defaults) that GLM-Image uses. ``enable_separate_cfg`` None: on,
    as cache-dit's GLM-Image adapter sets it (the two passes of a guided step keep their own caches)."""

    Fn_compute_blocks: int = field(default=8, metadata={"help": "blocks always computed first; how much their residual "
                                                               "changed decides"})
    Bn_compute_blocks: int = field(default=0, metadata={"help": "blocks always computed last"})
    residual_diff_threshold: float = field(default=0.08, metadata={"help": "skip the middle blocks while the first "
                                                                         "blocks' residual changed by less than this "
                                                                         "(relative L1)"})
    max_warmup_steps: int = field(default=8, metadata={"help": "steps at the start that are computed in full"})
    warmup_interval: int = field(default=1, metadata={"help": "of those, compute every N-th only"})
    max_cached_steps: int = field(default=-1, metadata={"help": "at most N skipped steps per pass (-1: no limit)"})
    max_continuous_cached_steps: int = field(default=-1, metadata={"help": "at most N skipped steps in a row "
                                                                           "(-1: no limit)"})
    enable_separate_cfg: bool | None = None

    def __post_init__(self):
        for name in ("Fn_compute_blocks", "Bn_compute_blocks", "max_warmup_steps", "warmup_interval",
                     "max_cached_steps", "max_continuous_cached_steps"):
            value = getattr(self, name)
            low = {"Fn_compute_blocks": 1, "warmup_interval": 1}.get(name, -1 if name.startswith("max_c") else 0)
            if not checks.is_int(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {checks.shown(value)}")
        if not (checks.is_number(self.residual_diff_threshold) and math.isfinite(self.residual_diff_threshold)):
            raise ValueError(f"residual_diff_threshold must be a finite number, got {checks.shown(self.residual_diff_threshold)}")
        if self.enable_separate_cfg not in (None, True, False):
            raise ValueError(f"enable_separate_cfg must be true, false or null, got {checks.shown(self.enable_separate_cfg)}")

    def check_blocks(self, n_blocks: int):
        if self.Fn_compute_blocks + self.Bn_compute_blocks > n_blocks:
            raise ValueError(f"Fn_compute_blocks + Bn_compute_blocks ({self.Fn_compute_blocks} + "
                             f"{self.Bn_compute_blocks}) must be at most the DiT's {n_blocks} blocks")


@dataclass(frozen=True, kw_only=True)
class TaylorSeerCalibratorConfig:
    """cache-dit's TaylorSeer calibrator: a cached step's residual is extrapolated from the computed steps'."""

    taylorseer_order: int = 1

    def __post_init__(self):
        if not checks.is_int(self.taylorseer_order) or not 0 <= self.taylorseer_order <= MAX_ORDER:
            raise ValueError(f"taylorseer_order must be an integer from 0 to {MAX_ORDER}, got "
                             f"{checks.shown(self.taylorseer_order)}")


# SGLang's published settings for GLM-Image (what --cache, and `"cache": true` in a request, turn on).
SGLANG = DBCacheConfig(Fn_compute_blocks=2, Bn_compute_blocks=1, max_warmup_steps=4, residual_diff_threshold=0.4,
                       max_continuous_cached_steps=4)
SGLANG_CALIBRATOR = TaylorSeerCalibratorConfig(taylorseer_order=2)


def published(taylorseer_order: int | None = None) -> tuple[DBCacheConfig, TaylorSeerCalibratorConfig | None]:
    """SGLang's settings, with another TaylorSeer order when one is given (0: none)."""
    if taylorseer_order is None:
        return SGLANG, SGLANG_CALIBRATOR
    return SGLANG, TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order) if taylorseer_order else None


class TaylorSeer:
    """cache-dit's TaylorSeerState, with its counting: a state made at its first update (at step 0) starts its
    own step count at -1, so its steps are the run's minus one, and no derivative is taken at its steps 0 and 1."""

    def __init__(self, order: int):
        self.n_derivatives = order
        self.current_step = -1
        self.last_computed_step = -1
        self.current: list = [None] * (order + 1)

    def mark_step_begin(self):
        self.current_step += 1

    def update(self, y: mx.array):
        """A computed step's residual: the new anchor, with finite-difference derivatives from the last one."""
        previous = self.current
        window = self.current_step - self.last_computed_step
        current = [None] * (self.n_derivatives + 1)
        current[0] = y
        for i in range(self.n_derivatives):
            if previous[i] is None or self.current_step <= 1:
                break
            current[i + 1] = (current[i] - previous[i]) / window
        self.current, self.last_computed_step = current, self.current_step

    def approximate(self) -> mx.array:
        elapsed = self.current_step - self.last_computed_step
        out = 0
        for i, derivative in enumerate(self.current):
            if derivative is None:
                break
            out = out + (1 / math.factorial(i)) * derivative * (elapsed**i)
        return out


@dataclass
class PassCache:
    """One cache context: a pass's steps (or every pass's, without separate caches)."""

    steps: int = 0  # executed so far
    cached_steps: list = field(default_factory=list)
    residual_diffs: dict = field(default_factory=dict)
    continuous: int = 0
    fn_residual: mx.array | None = None  # the image tokens' residual of the first blocks, at the last computed step
    residual: mx.array | None = None  # the middle blocks' residual (text and image), at the last computed step
    taylor: TaylorSeer | None = None


class StepCache:
    """The Stepper's blocks policy for one request (denoise.py): ``cache(pass, step, x, blocks)``."""

    def __init__(self, config: DBCacheConfig, calibrator: TaylorSeerCalibratorConfig | None = None):
        self.config, self.calibrator = config, calibrator
        self.separate = config.enable_separate_cfg is not False
        self.contexts: dict[str, PassCache] = {}

    def __call__(self, pass_, step: int, x: mx.array, blocks):
        c = self.config
        n = blocks.n_blocks
        ctx = self._begin(self.contexts.setdefault(pass_.name if self.separate else "all", PassCache()))
        f, b = c.Fn_compute_blocks, c.Bn_compute_blocks
        h = blocks(0, f, x)
        fn_residual = h[:, blocks.text_len:] - x[:, blocks.text_len:]
        step = ctx.steps - 1
        decide = self._may_cache(ctx, step)
        if decide and 0 < c.residual_diff_threshold < 1:
            diff = _relative_l1(ctx.fn_residual, fn_residual)
            yield diff  # the Stepper queues the other pass's first blocks, then comes back for the read
            ctx.residual_diffs[step] = diff.item()
            decide = ctx.residual_diffs[step] < c.residual_diff_threshold
        elif decide:  # a threshold of 1 or more: always similar (cache-dit records -1)
            ctx.residual_diffs[step] = -1.0
        if decide:
            ctx.cached_steps.append(step)
            ctx.continuous += 1
            h = h + (ctx.taylor.approximate() if ctx.taylor is not None else ctx.residual)
        else:
            ctx.fn_residual = fn_residual
            middle = blocks(f, n - b, h)
            residual = middle - h
            if self.calibrator is not None:
                if ctx.taylor is None:
                    ctx.taylor = TaylorSeer(self.calibrator.taylorseer_order)
                ctx.taylor.update(residual)
            else:
                ctx.residual = residual
            h = middle
        return blocks(n - b, n, h)

    def _begin(self, ctx: PassCache) -> PassCache:
        """cache-dit's mark_step_begin: count the step; a computed step before it ends a run of cached ones."""
        ctx.steps += 1
        if not ctx.cached_steps or ctx.cached_steps[-1] != ctx.steps - 2:
            ctx.continuous = 0
        if ctx.taylor is not None:
            ctx.taylor.mark_step_begin()
        return ctx

    def _may_cache(self, ctx: PassCache, step: int) -> bool:
        """cache-dit's can_cache before the diff: past the warmup, within the limits, with a step to compare to."""
        c = self.config
        if step in range(0, c.max_warmup_steps, c.warmup_interval):
            return False
        if 0 <= c.max_cached_steps <= len(ctx.cached_steps):
            return False
        if 0 <= c.max_continuous_cached_steps <= ctx.continuous:
            return False
        return c.residual_diff_threshold > 0 and ctx.fn_residual is not None

    def summary(self) -> dict:
        """cache-dit's summary keys: the 0-based steps cached in the conditional pass (``cached_steps``) and in
        the unconditional one (``cfg_*``), and the residual diff of every step compared ({step: diff})."""
        cond = self.contexts.get("cond" if self.separate else "all", PassCache())
        uncond = self.contexts.get("uncond", PassCache()) if self.separate else PassCache()
        return {"cached_steps": list(cond.cached_steps), "residual_diffs": dict(cond.residual_diffs),
                "cfg_cached_steps": list(uncond.cached_steps), "cfg_residual_diffs": dict(uncond.residual_diffs)}


def _relative_l1(previous: mx.array, current: mx.array) -> mx.array:
    previous, current = previous.astype(mx.float32), current.astype(mx.float32)
    return mx.mean(mx.abs(previous - current)) / mx.mean(mx.abs(previous))


def as_dict(config) -> dict | None:
    """A config as the metadata and the server's body spell it (cache-dit's field names), or None."""
    return dataclasses.asdict(config) if config is not None else None
