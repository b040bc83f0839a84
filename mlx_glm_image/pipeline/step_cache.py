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
Warm-up, limits and extrapolation count the Stepper's steps (the index it gives), which for the Euler sampler are
cache-dit's calls; a sampler that asks for two velocities in a step has both calls at that step.

A decision needs the diff on the host: one read per pass and step. The policy yields that lazy scalar to the
Stepper, which queues the next pass's first blocks before the read, so the device is not left idle while it waits.

``POLICIES`` chooses the blocks policy by the type of a request's cache config (diffusers' ``enable_cache``
dispatch); ``SGLANG`` is the preset that ``--cache``, a body's ``"cache": true``, their help and the README read.
"""

from __future__ import annotations

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


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Published step-cache settings, both configs together: what a switch (``--cache``, ``"cache": true``)
    turns on."""

    source: str
    cache_config: DBCacheConfig
    calibrator_config: TaylorSeerCalibratorConfig | None

    def settings(self, **given) -> dict:
        """The call's ``cache_config`` and ``calibrator_config`` with the switch on: the preset's, but for those
        ``given`` (a calibrator the user chose)."""
        return {"cache_config": self.cache_config, "calibrator_config": self.calibrator_config, **given}

    def described(self) -> str:
        """The settings in words (--help, the README)."""
        c, order = self.cache_config, self.calibrator_config.taylorseer_order if self.calibrator_config else 0
        words = [f"F{c.Fn_compute_blocks} B{c.Bn_compute_blocks}", f"warmup {c.max_warmup_steps}",
                 f"warmup interval {c.warmup_interval}", f"threshold {c.residual_diff_threshold}",
                 f"at most {c.max_cached_steps} cached steps",
                 f"at most {c.max_continuous_cached_steps} cached steps in a row"]
        shown = [True, True, c.warmup_interval != 1, True, c.max_cached_steps >= 0, c.max_continuous_cached_steps >= 0]
        return ", ".join([w for w, show in zip(words, shown) if show]
                         + [f"TaylorSeer order {order}" if order else "no TaylorSeer"])


SGLANG = Preset(source="SGLang's published GLM-Image settings",
                cache_config=DBCacheConfig(Fn_compute_blocks=2, Bn_compute_blocks=1, max_warmup_steps=4,
                                           residual_diff_threshold=0.4, max_continuous_cached_steps=4),
                calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=2))


class TaylorSeer:
    """cache-dit's TaylorSeerState, with its counting: a state made at its first update (at step 0) starts its
    own step count at -1, so its steps are the run's minus one, and no derivative is taken at its steps 0 and 1.
    A second update in one step (a sampler's second velocity) replaces that step's anchor: its derivatives are
    still taken from the last earlier step's."""

    def __init__(self, order: int, step: int):
        self.n_derivatives = order
        self.origin = step + 1  # its step count is the run's step minus this
        self.current_step = -1
        self.last_computed_step = -1
        self.current: list = [None] * (order + 1)
        self.earlier = (self.current, self.last_computed_step)  # the anchor before the current step's

    def mark_step_begin(self, step: int):
        self.current_step = step - self.origin

    def update(self, y: mx.array):
        """A computed step's residual: the new anchor, with finite-difference derivatives from the last one."""
        if self.last_computed_step != self.current_step:
            self.earlier = (self.current, self.last_computed_step)
        previous, previous_step = self.earlier
        window = self.current_step - previous_step
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

    step: int = -1  # of the last call
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
        ctx = self._begin(self.contexts.setdefault(pass_.name if self.separate else "all", PassCache()), step)
        f, b = c.Fn_compute_blocks, c.Bn_compute_blocks
        h = blocks(0, f, x)
        fn_residual = h[:, blocks.text_len:] - x[:, blocks.text_len:]
        decide = self._may_cache(ctx, step)
        if decide and 0 < c.residual_diff_threshold < 1:
            diff = _relative_l1(ctx.fn_residual, fn_residual)
            yield diff  # the Stepper queues the other pass's first blocks, then comes back for the read
            ctx.residual_diffs[step] = diff.item()
            decide = ctx.residual_diffs[step] < c.residual_diff_threshold
        elif decide:  # a threshold of 1 or more: always similar (cache-dit records -1)
            ctx.residual_diffs[step] = -1.0
        if decide:
            if ctx.cached_steps[-1:] != [step]:
                ctx.cached_steps.append(step)
                ctx.continuous += 1
            h = h + (ctx.taylor.approximate() if ctx.taylor is not None else ctx.residual)
        else:
            ctx.fn_residual = fn_residual
            middle = blocks(f, n - b, h)
            residual = middle - h
            if self.calibrator is not None:
                if ctx.taylor is None:
                    ctx.taylor = TaylorSeer(self.calibrator.taylorseer_order, step)
                ctx.taylor.update(residual)
            else:
                ctx.residual = residual
            h = middle
        return blocks(n - b, n, h)

    def _begin(self, ctx: PassCache, step: int) -> PassCache:
        """cache-dit's mark_step_begin at the Stepper's step: a computed step before it ends a run of cached ones
        (a second call in the same step begins nothing)."""
        if step != ctx.step:
            ctx.step = step
            if ctx.cached_steps[-1:] != [step - 1]:
                ctx.continuous = 0
            if ctx.taylor is not None:
                ctx.taylor.mark_step_begin(step)
        return ctx

    def _may_cache(self, ctx: PassCache, step: int) -> bool:
        """cache-dit's can_cache before the diff: past the warmup, within the limits (in steps: a step already
        cached counts once), with a step to compare to."""
        c = self.config
        if step in range(0, c.max_warmup_steps, c.warmup_interval):
            return False
        counted = ctx.cached_steps[-1:] == [step]
        if 0 <= c.max_cached_steps <= len(ctx.cached_steps) - counted:
            return False
        if 0 <= c.max_continuous_cached_steps <= ctx.continuous - counted:
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


# A cache config's type -> the blocks policy it turns on, made as policy(config, calibrator_config).
POLICIES = {DBCacheConfig: StepCache}


def blocks_policy(cache_config, calibrator_config: TaylorSeerCalibratorConfig | None):
    """A request's step-cache policy for the Stepper (``summary()`` gives what it decided), or None without one."""
    if cache_config is None:
        return None
    return POLICIES[type(cache_config)](cache_config, calibrator_config)
