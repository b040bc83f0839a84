"""The flow-matching sampler: one per request, made from the scheduler's configuration (scheduler.py) by the
denoise stage and owned by its Stepper, so nothing a request does changes what another one sees.

Flow matching moves the latents along a velocity from noise (sigma 1) to the image (sigma 0): ``x = (1 - sigma)
* x0 + sigma * noise`` and the DiT predicts ``v = noise - x0``. A sampler fixes its timesteps and sigmas when it
is made (GLM-Image's shifted schedule for one image size, as in mlx-examples flux's sampler) and gives the DiT's
timestep of a step (``model_timestep``), a step from a velocity (``step``), the clean latents a velocity points
at (``x0``, what previews show), noised latents (``add_noise``) and a training draw of timesteps with their
sigmas on the same shift (``random_timesteps``). ``SAMPLERS`` names them: another sampler (Heun, DPM) is a
subclass that overrides ``denoise_step`` (and ``step``), and one row.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from ..scheduler import SchedulerConfig, schedule


def dit_timestep(t):
    """What the DiT receives for the schedule's timestep ``t`` (an integer 1..1000): ``t - 1``."""
    return t - 1.0


class FlowMatchEulerSampler:
    """Euler steps over GLM-Image's shifted sigmas for ``image_seq_len`` DiT tokens: ``num_inference_steps`` of
    them, or the given ``timesteps`` / ``sigmas`` (scheduler.schedule). ``timesteps`` (N) and ``sigmas`` (N + 1,
    ending at 0) are float32 numpy arrays, fixed here."""

    def __init__(self, config: SchedulerConfig, *, image_seq_len: int, num_inference_steps: int | None = 50,
                 timesteps=None, sigmas=None):
        self.config, self.image_seq_len = config, image_seq_len
        self.timesteps, self.sigmas = schedule(config, num_inference_steps, image_seq_len, timesteps, sigmas)
        for a in (self.timesteps, self.sigmas):
            a.flags.writeable = False

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def model_timestep(self, i: int) -> float:
        """The DiT's timestep at step ``i``: the unshifted timestep minus one."""
        return dit_timestep(float(self.timesteps[self._checked(i)]))

    def denoise_step(self, velocity: Callable[[mx.array, float], mx.array], i: int,
                     x: mx.array) -> tuple[mx.array, mx.array]:
        """Step ``i`` of the loop: ``velocity(x, model_timestep)`` is the (guided) velocity of the model at ``x``,
        asked once per step here (a second-order sampler asks again). Returns the next latents and the velocity
        that took them there (``x0`` of the next latents reads it)."""
        v = velocity(x, self.model_timestep(i))
        return self.step(v, i, x), v

    def step(self, v: mx.array, i: int, x: mx.array) -> mx.array:
        """One Euler step ``x + (sigma_next - sigma) * v``, in float32 like diffusers, cast to the velocity's dtype."""
        self._checked(i)
        # dt computed from the float32 sigmas exactly as torch does (sigma_next - sigma in float32)
        dt = float(np.float32(self.sigmas[i + 1]) - np.float32(self.sigmas[i]))
        return (x.astype(mx.float32) + mx.array(dt, dtype=mx.float32) * v).astype(v.dtype)

    def x0(self, x: mx.array, v: mx.array, i: int) -> mx.array:
        """The clean latents ``x - sigma_i * v`` that latents ``x`` at noise level ``sigmas[i]`` and velocity ``v``
        point at (``i`` up to N: after the last step, sigma 0). After a step it is the same for its start and its
        end, so ``x0(step(v, i, x), v, i + 1)`` is ``x0(x, v, i)``."""
        if not 0 <= i <= self.num_inference_steps:
            raise ValueError(f"sigma index {i} is outside the schedule's {self.num_inference_steps + 1} sigmas")
        return x.astype(mx.float32) - float(self.sigmas[i]) * v.astype(mx.float32)

    @staticmethod
    def add_noise(x0: mx.array, noise: mx.array, sigma) -> mx.array:
        """Latents at noise level ``sigma`` (a number, or one per sample): ``sigma * noise + (1 - sigma) * x0``
        (diffusers' scale_noise)."""
        sigma = mx.array(sigma, dtype=mx.float32)
        sigma = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))
        return sigma * noise + (1.0 - sigma) * x0

    def random_timesteps(self, batch: int, key: mx.array) -> tuple[mx.array, mx.array]:
        """A training draw: (the DiT's timesteps, their sigmas), (batch,) float32 each. The timestep is uniform
        over the integers 1..num_train_timesteps, and its sigma is the one inference gives it at this image size
        (the same shift: the schedule of num_train_timesteps steps has every integer timestep once)."""
        timesteps, sigmas = schedule(self.config, self.config.num_train_timesteps, self.image_seq_len)
        picked = mx.random.randint(0, len(timesteps), (batch,), key=key)
        return dit_timestep(mx.array(timesteps)[picked]), mx.array(sigmas[:-1])[picked]

    def _checked(self, i: int) -> int:
        if not 0 <= i < self.num_inference_steps:
            raise ValueError(f"step {i} is outside the schedule of {self.num_inference_steps} steps")
        return i


SAMPLERS = {"euler": FlowMatchEulerSampler}  # the samplers a request may name (Schedule.sampler)
