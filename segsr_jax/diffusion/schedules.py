"""Noise schedules of the two diffusion processes and the inference timestep grids.

Two forward processes run side by side, sharing the step index (the seg process reads it as
continuous time ``t / T``, so both models step together):

- **SR** (the Stable Diffusion latent process): discrete steps ``t in {0 .. T-1}`` with
  ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, where ``a_t = alphas_cumprod[t]`` comes from the
  betas of :class:`NoiseConfig` (SD: ``scaled_linear``, 0.00085..0.012, T = 1000).
- **Seg** (DDP's continuous cosine process): ``S_t = alpha(t) S_0 + sigma(t) eps`` with continuous
  ``t in [0, 0.999]`` and ``alpha^2 + sigma^2 = 1`` given by :func:`seg_logsnr`. The seg model is
  evaluated at ``t = sr_timestep / T``, so both models share the step index.

Everything here is numpy, computed once on the host in float64; :mod:`.samplers` turns it into the
float32 per-step coefficient arrays that the sampling scan consumes. :func:`seg_logsnr` and
:func:`seg_alpha_sigma` also accept jax arrays (training draws continuous times on device).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# DDP's cosine log-SNR: a shifted/scaled cosine so that t = 0 is not exactly noise-free, and
# tan^2 clamped at 1e-5 before the log (DDP's `log(..., eps=1e-5)`), which caps the log-SNR at
# -log(1e-5) ~= 11.5 for t < ~0.0018 (only the last step's target time ever gets there).
SEG_SHIFT = 2e-4
SEG_SCALE = 2.5e-4
SEG_TAN2_MIN = 1e-5
# The continuous seg time never reaches 1: DDP samples training times in [0, 0.999].
SEG_T_MAX = 0.999


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """The SR model's training-time forward process (the ``scheduler/`` config of an SD folder).

    Attributes:
      num_train_timesteps: T, the number of discrete training steps.
      beta_schedule: ``scaled_linear`` (SD: betas = linspace(sqrt(start), sqrt(end))^2) or
        ``linear``.
      beta_start, beta_end: first and last beta.
      prediction_type: what the UNet predicts: ``epsilon`` (SD-2-base) or ``v_prediction``
        (SD-2 768-v).
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(
                f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )


def make_betas(config: NoiseConfig) -> np.ndarray:
    """Per-step betas, float64 ``[T]``."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    return np.linspace(config.beta_start, config.beta_end, n)


def alphas_cumprod(config: NoiseConfig) -> np.ndarray:
    """``a_t = prod_{s <= t} (1 - beta_s)``, float64 ``[T]``, decreasing from ~1 to ~0.0047 (SD).

    Computed in float64; diffusers' float32 torch values agree to ~1e-6 relative.
    """
    return np.cumprod(1.0 - make_betas(config))


def make_timesteps(
    num_steps: int,
    spacing: str = "leading",
    *,
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    endpoint_grid: bool = False,
) -> np.ndarray:
    """The descending integer timesteps of an inference schedule, as diffusers computes them.

    Args:
      num_steps: N, the number of denoising steps.
      spacing: ``leading`` (``arange(N) * (T // N)`` + ``steps_offset``; SD/SeeSR with offset 1
        and N = 50: 981, 961, ..., 1), ``trailing`` (``round(arange(T, 0, -T/N)) - 1``: starts at
        T-1) or ``linspace`` (``round(linspace(0, T-1, N))``).
      num_train_timesteps: T.
      steps_offset: added to ``leading`` timesteps (diffusers ignores it for the other spacings).
      endpoint_grid: DPM-Solver's convention: for ``leading`` and ``linspace`` lay out N + 1
        points, the last of which is the clean end t = 0, and drop that last point (its
        ``leading`` ratio is ``T // (N + 1)``). DDPM and DDIM use ``False``.

    Returns:
      int64 ``[N]``, descending; equal to diffusers' ``scheduler.timesteps`` after
      ``set_timesteps(N)``.
    """
    n, big_t = int(num_steps), int(num_train_timesteps)
    if not 1 <= n <= big_t:
        raise ValueError(f"num_steps must be in [1, {big_t}], got {num_steps}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep spacing {spacing!r} is not one of {TIMESTEP_SPACINGS}")
    grid = n + 1 if endpoint_grid else n
    if spacing == "linspace":
        ts = np.linspace(0, big_t - 1, grid).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(grid) * (big_t // grid)).round()[::-1] + steps_offset
    else:
        ts = np.round(np.arange(big_t, 0, -big_t / n)) - 1
    if endpoint_grid and spacing != "trailing":
        ts = ts[:-1]
    return np.ascontiguousarray(ts).astype(np.int64)


def _xp(t):
    # jax arrays (tracers included) stay on device in float32; anything else is host float64.
    return jnp if isinstance(t, jax.Array) else np


def seg_logsnr(t):
    """DDP's cosine log-SNR of the seg process at continuous time ``t`` (any shape).

    ``logsnr(t) = -log(max(1 / cos(((t + 2e-4) / (1 + 2.5e-4)) * pi/2)^2 - 1, 1e-5))``;
    decreasing in t, about 11.5 (capped) near t = 0 and -7.8 at t = 0.999.
    """
    xp = _xp(t)
    angle = (xp.asarray(t) + SEG_SHIFT) / (1.0 + SEG_SCALE) * (math.pi / 2)
    # tan^2 == 1/cos^2 - 1, without the float32 cancellation of the latter near t = 0.
    tan2 = xp.tan(angle) ** 2
    return -xp.log(xp.maximum(tan2, SEG_TAN2_MIN))


def seg_alpha_sigma(t):
    """``(alpha, sigma) = (sqrt(sigmoid(logsnr)), sqrt(sigmoid(-logsnr)))`` of the seg process.

    Same shape as ``t``; ``alpha^2 + sigma^2 = 1``; alpha falls and sigma rises with t.
    """
    xp = _xp(t)
    logsnr = seg_logsnr(t)
    # sigmoid(z) = 1 / (1 + exp(-z)); logsnr is bounded (|z| < 12), so no overflow.
    return xp.sqrt(1.0 / (1.0 + xp.exp(-logsnr))), xp.sqrt(1.0 / (1.0 + xp.exp(logsnr)))


def seg_time(sr_timesteps, num_train_timesteps: int = 1000) -> np.ndarray:
    """Continuous seg time of SR timesteps: ``clip(t / T, 0, 0.999)``; a negative timestep (the
    clean end after the last step) maps to 0. float64, same shape."""
    t = np.asarray(sr_timesteps, np.float64) / num_train_timesteps
    return np.clip(t, 0.0, SEG_T_MAX)
