"""GLM-Image's flow-matching schedule: the scheduler component's configuration (scheduler_config.json, diffusers
0.42.1 FlowMatchEulerDiscreteScheduler's fields) and the timesteps and sigmas it gives a run, built as
GlmImagePipeline builds them.

The schedule is numpy (a handful of floats, computed exactly as the reference does, float32 included). Nothing
here holds a run's state: the sampler made for each request (``pipeline/flow.py``) keeps its schedule.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import loading
from .models.base import config_from_dict


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    base_shift: float = 0.25,
    max_shift: float = 0.75,
) -> float:
    """mu for the resolution-dependent time shift (GLM-Image's form: sqrt, not the linear fit of Flux)."""
    m = (image_seq_len / base_seq_len) ** 0.5
    return m * max_shift + base_shift


@dataclass(frozen=True)
class SchedulerConfig:
    # Defaults: diffusers' (what it reads when a key is absent); the released scheduler_config.json (dynamic, linear
    # shifting from 0.25 to 0.75) is in models/released.py.
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        return config_from_dict(cls, d)

    @classmethod
    def from_pretrained(cls, folder_or_path: str | os.PathLike, subfolder: str | None = None) -> "SchedulerConfig":
        """From a scheduler folder (or its scheduler_config.json, a pipeline folder or a Hub repo id)."""
        path = Path(folder_or_path)
        if path.is_file():
            return cls.from_dict(json.loads(path.read_text()))
        folder = loading.component_folder(folder_or_path, "scheduler", subfolder)
        return cls.from_dict(loading.read_config(folder, "scheduler_config.json"))

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if self.use_karras_sigmas + self.use_exponential_sigmas + self.use_beta_sigmas > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
        if self.use_beta_sigmas:
            raise NotImplementedError("use_beta_sigmas (needs scipy) is not supported")
        if self.stochastic_sampling:
            raise NotImplementedError("stochastic_sampling is not supported (GLM-Image does not use it)")


def schedule(
    config: SchedulerConfig,
    num_inference_steps: int | None = 50,
    image_seq_len: int | None = None,
    timesteps: list[float] | np.ndarray | None = None,
    sigmas: list[float] | np.ndarray | None = None,
    mu: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of GlmImagePipeline's schedule for ``image_seq_len`` DiT tokens ((H/8/2) * (W/8/2)).

    Timesteps ``linspace(1000, 1, N + 1)[:-1]`` truncated to integers, sigmas ``timesteps / 1000`` shifted with
    ``mu = calculate_shift(image_seq_len)``, a final 0 appended (N + 1 sigmas, float32). The timesteps stay
    unshifted (the DiT receives ``t - 1``). Custom ``timesteps`` are truncated to integers as the pipeline does;
    custom ``sigmas`` are used as given (then shifted); either one must have ``num_inference_steps`` entries when
    both a count and a list decide the length. ``mu`` overrides the value computed from ``image_seq_len``.
    """
    if timesteps is None:
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps, timesteps or sigmas")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        timesteps = np.linspace(config.num_train_timesteps, 1.0, num_inference_steps + 1)[:-1]
    else:
        timesteps = np.asarray(timesteps)
    timesteps = timesteps.astype(np.int64).astype(np.float32)
    sigmas = timesteps / config.num_train_timesteps if sigmas is None else sigmas
    if mu is None:
        if image_seq_len is None:
            if config.use_dynamic_shifting:
                raise ValueError("image_seq_len (or mu) is required: the schedule depends on the resolution")
        else:
            mu = calculate_shift(image_seq_len, config.base_image_seq_len, config.base_shift, config.max_shift)
    # From here on: diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(timesteps=, sigmas=, mu=), which is
    # what retrieve_timesteps calls (both lists are always given by the pipeline).
    return _shifted(config, timesteps, sigmas, mu)


def _time_shift(config: SchedulerConfig, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
    if config.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    return mu / (mu + (1 / t - 1) ** sigma)


def _shifted(cfg: SchedulerConfig, timesteps, sigmas, mu) -> tuple[np.ndarray, np.ndarray]:
    if len(sigmas) != len(timesteps):
        raise ValueError(f"sigmas ({len(sigmas)}) and timesteps ({len(timesteps)}) should have the same length")
    if len(sigmas) == 0:
        raise ValueError("the schedule is empty")
    timesteps = np.asarray(timesteps).astype(np.float32)
    sigmas = np.asarray(sigmas).astype(np.float32)
    n = len(sigmas)
    if cfg.use_dynamic_shifting:
        if mu is None:
            raise ValueError("mu must be given when use_dynamic_shifting is set")
        sigmas = _time_shift(cfg, mu, 1.0, sigmas)
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    if cfg.shift_terminal:
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - cfg.shift_terminal)
        sigmas = 1 - (one_minus_z / scale_factor)
    if cfg.use_karras_sigmas:
        lo, hi = float(sigmas[-1]), float(sigmas[0])
        ramp = np.linspace(0, 1, n)
        rho = 7.0
        sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    elif cfg.use_exponential_sigmas:
        lo, hi = float(sigmas[-1]), float(sigmas[0])
        sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
    sigmas = np.asarray(sigmas).astype(np.float32)
    if cfg.invert_sigmas:
        sigmas = (1.0 - sigmas).astype(np.float32)
        timesteps = (sigmas * cfg.num_train_timesteps).astype(np.float32)
        sigmas = np.concatenate([sigmas, np.ones(1, np.float32)])
    else:
        sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
    return timesteps, sigmas
