"""Samplers as numpy-precomputed per-step coefficients plus pure jnp step functions.

Every supported SR sampler (DDPM, DDIM, DPM-Solver++(2M)) is, per step, a *linear* map of four
arrays: the current sample ``x_t``, the model's x0-prediction ``x0_hat`` (itself linear in
``x_t`` and the model output), the previous step's x0-prediction (DPM-Solver++'s second-order
history) and fresh Gaussian noise::

    x0_hat = c.x0_from_x * x_t + c.x0_from_out * model_out
    x_prev = c.x * x_t + c.x0 * x0_hat + c.prev_x0 * prev_x0_hat + c.noise * noise

So one step body serves all samplers; which sampler runs is decided entirely by the numbers in
:class:`SRCoeffs`, computed here on the host in float64 from diffusers' formulas. The seg
(DDP) sampler is ``S_next = alpha' S0_hat + sigma' (S_t - alpha S0_hat) / sigma``.

How the sampling scan uses this (the lead's ``sampling.py``)::

    sched = make_schedule("ddpm", 50)                 # numpy, host side, once per config
    state = init_state(initial_latent(z_lq, eps, alphas_cumprod(NoiseConfig())))
    def body(carry, s):                               # s: Schedule with scalar leaves
        state, seg, key = carry
        eps_hat = unet(state.x, s.timestep, ...)      # int32 scalar timestep
        logits = segdm(seg, s.seg.time, ...)          # or s.seg.logsnr, as DDP does
        key, k = jax.random.split(key)
        state = sr_step(s.sr, state, eps_hat, jax.random.normal(k, state.x.shape))
        seg = seg_step(s.seg, seg, embed(softmax(logits)))
        return (state, seg, key), None
    (state, seg, key), _ = jax.lax.scan(body, (state, seg0, key), sched)

Pass ``sched`` into the jitted function as an argument (do not close over it: its arrays would
become constants of the compiled program). The number of steps is the arrays' length, never a
Python int inside the loop. For deterministic samplers (``sched.stochastic`` is False) the noise
is weighted by 0 at every step, so the caller may pass zeros and skip the random draw.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from segsr_jax.diffusion.options import SEG_GRIDS, strength_steps
from segsr_jax.diffusion.schedules import (
    NoiseConfig,
    alphas_cumprod,
    make_timesteps,
    seg_alpha_sigma,
    seg_logsnr,
    seg_time,
)

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
# What a diffusers pipeline gets when it loads the SD scheduler config into each class (the SD
# config names no spacing, so each class's own default applies); steps_offset = 1 from SD.
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace"}
# DDP divides by sigma clamped here; sigma >= 3e-4 on [0, 0.999], so it is only a guard.
SEG_SIGMA_MIN = 1e-8


def _pytree(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class SRCoeffs:
    """Per-step SR sampler coefficients; each field float32 ``[N]`` (a scalar inside the scan).

    Attributes:
      x0_from_x, x0_from_out: ``x0_hat = x0_from_x * x_t + x0_from_out * model_out``
        (epsilon: ``1/sqrt(a_t)``, ``-sqrt(1-a_t)/sqrt(a_t)``; v: ``sqrt(a_t)``, ``-sqrt(1-a_t)``).
      x, x0, prev_x0, noise: weights of ``x_t``, ``x0_hat``, the previous step's ``x0_hat`` and
        the step's standard-normal noise in ``x_prev``.
    """

    x0_from_x: np.ndarray
    x0_from_out: np.ndarray
    x: np.ndarray
    x0: np.ndarray
    prev_x0: np.ndarray
    noise: np.ndarray


@_pytree
class SegCoeffs:
    """Per-step DDP seg sampler coefficients; each field float32 ``[N]``.

    Attributes:
      alpha, sigma: the seg process at this step's time ``time``.
      alpha_next, sigma_next: at the next step's time (0 after the last step).
      time: continuous time ``t / T`` in [0, 0.999] of this step.
      logsnr: ``seg_logsnr(time)``; DDP feeds the log-SNR (not t) to its time embedding, so the
        SegDM may take either, as its config says.
    """

    alpha: np.ndarray
    sigma: np.ndarray
    alpha_next: np.ndarray
    sigma_next: np.ndarray
    time: np.ndarray
    logsnr: np.ndarray


@_pytree
class Schedule:
    """Everything the sampling scan consumes; every array leaf has leading axis N (the steps), so
    the whole object is the ``xs`` of ``jax.lax.scan`` and the body sees scalar leaves.

    Attributes:
      timestep: int32 ``[N]``, the SR model's discrete timestep per step (diffusers'
        ``scheduler.timesteps``).
      sr: :class:`SRCoeffs`.
      seg: :class:`SegCoeffs` on the same step index.
      stochastic: static: whether any SR step adds noise (DDPM; DDIM with eta > 0). Part of the
        tree structure, so a jitted sampler can branch on it in Python.
    """

    timestep: np.ndarray
    sr: SRCoeffs
    seg: SegCoeffs
    stochastic: bool = dataclasses.field(metadata=dict(static=True))

    def __len__(self) -> int:
        return int(np.shape(self.timestep)[0])


@_pytree
class SamplerState:
    """The SR part of the scan carry.

    Attributes:
      x: ``[B, H, W, C]`` the current latent ``x_t``.
      x0: ``[B, H, W, C]`` the previous step's x0-prediction (zeros before the first step;
        DPM-Solver++(2M) reads it, the other samplers weigh it by 0). Also handy for previews.
    """

    x: jax.Array
    x0: jax.Array


def init_state(x_start: jax.Array) -> SamplerState:
    """The carry before the first step: ``x = x_start`` ``[B, H, W, C]``, no x0 history."""
    return SamplerState(x=x_start, x0=jnp.zeros_like(x_start))


def sr_step(
    c: SRCoeffs, state: SamplerState, model_out: jax.Array, noise: jax.Array
) -> SamplerState:
    """One SR reverse step ``x_t -> x_prev`` for any sampler (pure, elementwise, any layout).

    Args:
      c: this step's coefficients (scalar leaves: one slice of :class:`SRCoeffs`).
      state: ``x`` = ``x_t`` and the previous x0-prediction, each ``[B, H, W, C]``.
      model_out: ``[B, H, W, C]`` the UNet output at ``(x_t, t)`` (after guidance): epsilon or v,
        as the :class:`NoiseConfig` the coefficients were made with says.
      noise: ``[B, H, W, C]`` standard normal noise; used only where ``c.noise != 0``.

    Returns:
      The new state: ``x`` = ``x_prev``, ``x0`` = this step's x0-prediction. Arithmetic is in
      float32 (like diffusers' upcast); results are cast back to the state's dtypes so the scan
      carry keeps its type.
    """
    f32 = jnp.float32
    x = state.x.astype(f32)
    x0 = c.x0_from_x * x + c.x0_from_out * model_out.astype(f32)
    x_prev = c.x * x + c.x0 * x0 + c.prev_x0 * state.x0.astype(f32) + c.noise * noise.astype(f32)
    return SamplerState(x=x_prev.astype(state.x.dtype), x0=x0.astype(state.x0.dtype))


def seg_step(c: SegCoeffs, s_t: jax.Array, s0_hat: jax.Array) -> jax.Array:
    """One DDP seg step ``S_t -> S_next`` (DDIM-style, deterministic).

    Args:
      c: this step's :class:`SegCoeffs` slice (scalars).
      s_t: ``[B, h, w, D]`` the current seg state.
      s0_hat: ``[B, h, w, D]`` the x0-estimate, already re-embedded by the caller
        (``(sigmoid(embed(pred)) * 2 - 1) * bit_scale``).

    Returns:
      ``alpha' S0_hat + sigma' eps`` with ``eps = (S_t - alpha S0_hat) / sigma``, in ``s_t``'s
      dtype.
    """
    f32 = jnp.float32
    s0 = s0_hat.astype(f32)
    eps = (s_t.astype(f32) - c.alpha * s0) / jnp.maximum(c.sigma, SEG_SIGMA_MIN)
    return (c.alpha_next * s0 + c.sigma_next * eps).astype(s_t.dtype)


def start_timestep(schedule: Schedule, num_train_timesteps: int, strength: float) -> int:
    """The SR timestep the LQ latent is noised to before ``schedule``'s first step: SeeSR's
    ``T - 1`` for the whole schedule (``strength`` 1), else the first kept timestep."""
    return num_train_timesteps - 1 if strength >= 1.0 else int(schedule.timestep[0])


def initial_latent(
    z_lq: jax.Array, noise: jax.Array, alphas_cumprod: np.ndarray, t_start: int = 999
) -> jax.Array:
    """SeeSR's start: the LQ latent noised to ``t_start``,
    ``sqrt(a) z_lq + sqrt(1 - a) eps`` with ``a = alphas_cumprod[t_start]``.

    SeeSR noises to 999 although its first leading step is 981. ``z_lq``, ``noise``:
    ``[B, h, w, 4]``; ``alphas_cumprod``: host ``[T]`` (from :func:`schedules.alphas_cumprod`).
    """
    a = float(np.asarray(alphas_cumprod)[t_start])
    return (math.sqrt(a) * z_lq + math.sqrt(1.0 - a) * noise).astype(z_lq.dtype)


def _x0_coeffs(a_t: np.ndarray, prediction_type: str):
    """``x0 = p x_t + q out`` for the given prediction type."""
    if prediction_type == "epsilon":
        return 1.0 / np.sqrt(a_t), -np.sqrt(1.0 - a_t) / np.sqrt(a_t)
    return np.sqrt(a_t), -np.sqrt(1.0 - a_t)


def ddpm_coeffs(timesteps: np.ndarray, ac: np.ndarray, prediction_type: str) -> SRCoeffs:
    """DDPM posterior steps, as diffusers' ``DDPMScheduler`` (variance ``fixed_small``, no x0
    clipping, as SD's config): ``x_prev = mean(x_t, x0_hat) + sqrt(var) * noise``, the previous
    timestep being the next entry of ``timesteps`` (-1, i.e. ``a = 1``, after the last), and no
    noise at ``t = 0``."""
    a_t = ac[timesteps]
    a_prev = np.append(ac[timesteps[1:]], 1.0)
    alpha = a_t / a_prev  # the one-"step" alpha between the two grid points
    c_x0 = np.sqrt(a_prev) * (1.0 - alpha) / (1.0 - a_t)
    c_x = np.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)
    # diffusers clamps the variance at 1e-20 before taking its root.
    var = np.maximum((1.0 - a_prev) / (1.0 - a_t) * (1.0 - alpha), 1e-20)
    std = np.where(timesteps > 0, np.sqrt(var), 0.0)
    p, q = _x0_coeffs(a_t, prediction_type)
    return _sr_coeffs(p, q, c_x, c_x0, np.zeros_like(a_t), std)


def ddim_coeffs(
    timesteps: np.ndarray,
    ac: np.ndarray,
    prediction_type: str,
    *,
    num_train_timesteps: int,
    eta: float = 0.0,
    set_alpha_to_one: bool = False,
) -> SRCoeffs:
    """DDIM steps, as diffusers' ``DDIMScheduler`` (no clipping):
    ``x_prev = sqrt(a') x0_hat + sqrt(1 - a' - std^2) eps_hat + std noise`` with
    ``std = eta * sqrt((1-a')/(1-a) (1 - a/a'))``.

    Like diffusers, the previous timestep is ``t - T // N`` whatever the spacing (exact for
    ``leading``); below 0 it uses ``a' = 1`` if ``set_alpha_to_one`` else ``a_0`` (SD: False).
    ``eps_hat = (x_t - sqrt(a) x0_hat) / sqrt(1 - a)`` keeps the step linear in
    ``(x_t, x0_hat)``.
    """
    prev = timesteps - num_train_timesteps // len(timesteps)
    final = 1.0 if set_alpha_to_one else ac[0]
    a_t = ac[timesteps]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * np.sqrt(var)
    direction = np.sqrt(1.0 - a_prev - std**2)
    c_x = direction / np.sqrt(1.0 - a_t)
    c_x0 = np.sqrt(a_prev) - direction * np.sqrt(a_t) / np.sqrt(1.0 - a_t)
    p, q = _x0_coeffs(a_t, prediction_type)
    return _sr_coeffs(p, q, c_x, c_x0, np.zeros_like(a_t), std)


def dpmpp_2m_coeffs(timesteps: np.ndarray, ac: np.ndarray, prediction_type: str) -> SRCoeffs:
    """DPM-Solver++(2M), as diffusers' ``DPMSolverMultistepScheduler`` with
    ``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"`` and the
    0.42 defaults ``final_sigmas_type="zero"``, ``lower_order_final=True``.

    In the half-log-SNR ``lambda = log(alpha/sigma)``, with ``h = lambda_next - lambda_now``:
    first order ``x_prev = (s'/s) x - alpha' (e^-h - 1) D0`` and second order
    ``D0 = m0 + (m0 - m1) / (2 r)``, ``r = h_prev / h`` (``m0``/``m1``: this and the previous
    x0-prediction). The first step has no history (first order); the final step goes to sigma = 0,
    where diffusers always falls back to first order (that already covers its "lower order final
    below 15 steps", which only changes order-3 solvers) and returns ``x0_hat`` exactly.
    """
    n = len(timesteps)
    a_t = ac[timesteps]
    # diffusers' sigmas s = sqrt((1-a)/a); the grid ends at s = 0 (the clean sample).
    s = np.append(np.sqrt((1.0 - a_t) / a_t), 0.0)
    alpha = 1.0 / np.sqrt(s**2 + 1.0)
    sigma = s * alpha
    lam = -np.log(s[:-1])  # lambda at the N evaluation points (all finite)
    c_x = sigma[1:] / sigma[:-1]
    base = -alpha[1:] * (s[1:] / s[:-1] - 1.0)  # -alpha' (e^-h - 1), since e^-h = s'/s
    c_x0, c_prev = base.copy(), np.zeros(n)
    i = np.arange(1, n - 1)  # second order: a history exists and the target sigma is not 0
    if i.size:
        h = -np.log(s[i + 1]) - lam[i]
        r = (lam[i] - lam[i - 1]) / h
        c_x0[i] = base[i] * (1.0 + 0.5 / r)
        c_prev[i] = -base[i] * 0.5 / r
    p, q = _x0_coeffs(a_t, prediction_type)
    return _sr_coeffs(p, q, c_x, c_x0, c_prev, np.zeros(n))


def _sr_coeffs(*arrays) -> SRCoeffs:
    return SRCoeffs(*(np.asarray(a, np.float64).astype(np.float32) for a in arrays))


def seg_coeffs(timesteps: np.ndarray, num_train_timesteps: int, grid: str = "ddp") -> SegCoeffs:
    """DDP seg coefficients for the SR steps ``timesteps`` (same step index, same start).

    ``grid`` (:data:`segsr_jax.diffusion.options.SEG_GRIDS`): where SegDM is evaluated.

    - ``ddp``: DDP's own sampler grid, evenly spaced from the first step's time
      ``t0 = t_0 / T``: step ``i`` of ``n`` at ``t0 (n - i) / n``, so the last evaluation is
      at ``t0 / n`` (0.048 for DDIM 20 from t = 951) and the state then goes to 0.
    - ``shared``: the SR timesteps' own times, ``t_i / T``; the last evaluation is then at
      ``t_{n-1} / T`` (0.001 for SD's leading spacing), at DDP's log-SNR cap, which training
      draws for 2 of its 1000 timesteps. SegDM's map there trailed its step before by 0.007
      mIoU on 256 confirmation scenes in one run; the same inputs at the step before's seg
      time gave back 0.005 of it (README, "SegDM's trajectory").

    Both give the same first time, the one :func:`segsr_jax.diffusion.sampling` noises the
    start map to when ``strength < 1``, and the same grid for one step.
    """
    if grid == "ddp":
        n = len(timesteps)
        now = seg_time(timesteps[:1], num_train_timesteps)[0] * (n - np.arange(n)) / n
        nxt = np.append(now[1:], 0.0)
    elif grid == "shared":
        now = seg_time(timesteps, num_train_timesteps)
        nxt = np.append(seg_time(timesteps[1:], num_train_timesteps), 0.0)
    else:
        raise ValueError(f"seg grid {grid!r}: choose one of {', '.join(SEG_GRIDS)}")
    alpha, sigma = seg_alpha_sigma(now)
    alpha_next, sigma_next = seg_alpha_sigma(nxt)
    f32 = lambda a: np.asarray(a).astype(np.float32)
    return SegCoeffs(
        alpha=f32(alpha),
        sigma=f32(sigma),
        alpha_next=f32(alpha_next),
        sigma_next=f32(sigma_next),
        time=f32(now),
        logsnr=f32(seg_logsnr(now)),
    )


def make_schedule(
    sampler: str,
    num_steps: int,
    noise: NoiseConfig | None = None,
    *,
    timestep_spacing: str | None = None,
    steps_offset: int = 1,
    eta: float = 0.0,
    set_alpha_to_one: bool = False,
    strength: float = 1.0,
    seg_grid: str = "ddp",
) -> Schedule:
    """Everything one sampling run needs, as host numpy arrays with leading axis ``num_steps``.

    Args:
      sampler: one of :data:`SAMPLERS`: ``ddpm`` (SeeSR's default, 50 steps), ``ddim``,
        ``dpmpp_2m``.
      num_steps: N, the number of denoising steps (and scan iterations).
      noise: the SR model's forward process (None: SD's, ``NoiseConfig()``).
      timestep_spacing: ``leading`` | ``trailing`` | ``linspace``; None = what diffusers gives
        for an SD scheduler config (:data:`DEFAULT_SPACING`).
      steps_offset: added to ``leading`` timesteps (SD: 1, so 50 steps run 981 .. 1).
      eta: DDIM noise scale (0 = deterministic); must be 0 for the other samplers.
      set_alpha_to_one: DDIM's alpha after the last step (SD: False, ``a_0``).
      strength: how far the start lies from the LQ (diffusers' img2img ``strength``): the
        last :func:`strength_steps` of the N timesteps are kept, and the run starts from the
        LQ latent noised to the first kept one (:func:`start_timestep`). 1: the whole
        schedule (SeeSR). The coefficients are those of the kept timesteps (a multistep
        sampler starts with its first-order step), and the segmentation diffusion, which
        starts from the LQ segmentation noised to the same time, follows the kept steps.
      seg_grid: the segmentation diffusion's times (:func:`seg_coeffs`).

    Returns:
      A :class:`Schedule` (``timestep`` int32 ``[n]``, ``sr``/``seg`` float32 ``[n]`` arrays,
      ``n = strength_steps(N, strength)``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise ValueError(f"eta={eta} is only meaningful for ddim (and must be >= 0)")
    noise = noise or NoiseConfig()
    spacing = timestep_spacing or DEFAULT_SPACING[sampler]
    big_t = noise.num_train_timesteps
    ts = make_timesteps(
        num_steps,
        spacing,
        num_train_timesteps=big_t,
        steps_offset=steps_offset,
        endpoint_grid=sampler == "dpmpp_2m",
    )
    if ts.max() >= big_t or ts.min() < 0:
        raise ValueError(
            f"timesteps {ts.min()}..{ts.max()} fall outside [0, {big_t}): "
            f"steps_offset={steps_offset} is too large for {num_steps} steps"
        )
    keep = strength_steps(num_steps, strength)
    ac = alphas_cumprod(noise)
    if sampler == "ddpm":
        sr = ddpm_coeffs(ts, ac, noise.prediction_type)
    elif sampler == "ddim":
        sr = ddim_coeffs(
            ts,
            ac,
            noise.prediction_type,
            num_train_timesteps=big_t,
            eta=eta,
            set_alpha_to_one=set_alpha_to_one,
        )
    else:  # multistep: a truncated run starts with its first-order step
        sr = dpmpp_2m_coeffs(ts[num_steps - keep :], ac, noise.prediction_type)
    ts = ts[num_steps - keep :]
    # DDPM and DDIM steps depend on the whole grid (DDIM's stride T // N): cut after computing.
    sr = jax.tree.map(lambda a: a[len(a) - keep :], sr)
    return Schedule(
        timestep=ts.astype(np.int32),
        sr=sr,
        seg=seg_coeffs(ts, big_t, seg_grid),
        stochastic=bool(np.any(sr.noise != 0)),
    )
