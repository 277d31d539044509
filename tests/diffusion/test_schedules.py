"""Noise schedules and timestep grids against diffusers, and the DDP seg schedule's closed form."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from segsr_jax.diffusion import schedules
from segsr_jax.diffusion.schedules import NoiseConfig

ds = pytest.importorskip("diffusers")

SD = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
)


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(schedule):
    ref = ds.DDPMScheduler(**{**SD, "beta_schedule": schedule})
    cfg = NoiseConfig(beta_schedule=schedule)
    np.testing.assert_allclose(schedules.make_betas(cfg), ref.betas.numpy(), rtol=1e-6)
    # float64 here vs diffusers' float32 cumprod: agree to ~1e-6 relative.
    np.testing.assert_allclose(schedules.alphas_cumprod(cfg), ref.alphas_cumprod.numpy(), rtol=5e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 333])
def test_timesteps_match_diffusers(spacing, steps):
    for cls, endpoint in [
        (ds.DDPMScheduler, False),
        (ds.DDIMScheduler, False),
        (ds.DPMSolverMultistepScheduler, True),
    ]:
        ref = cls(**SD, steps_offset=1, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        ours = schedules.make_timesteps(steps, spacing, steps_offset=1, endpoint_grid=endpoint)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=cls.__name__)


def test_seesr_leading_grid():
    ts = schedules.make_timesteps(50, "leading", steps_offset=1)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50
    assert np.all(np.diff(ts) == -20)


def test_timestep_errors():
    with pytest.raises(ValueError, match="num_steps"):
        schedules.make_timesteps(0)
    with pytest.raises(ValueError, match="num_steps"):
        schedules.make_timesteps(1001)
    with pytest.raises(ValueError, match="spacing"):
        schedules.make_timesteps(10, "cosine")


def test_noise_config_validates():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseConfig(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="beta_start"):
        NoiseConfig(beta_start=0.02, beta_end=0.01)


def _closed_form_logsnr(t):
    return -math.log(1.0 / math.cos(((t + 2e-4) / (1 + 2.5e-4)) * math.pi / 2) ** 2 - 1.0)


@pytest.mark.parametrize("t", [0.002, 0.01, 0.25, 0.5, 0.75, 0.981, 0.999])
def test_seg_logsnr_closed_form(t):
    got = float(schedules.seg_logsnr(np.float64(t)))
    # (the closed form itself loses ~1e-11 to cancellation at small t in float64)
    assert got == pytest.approx(_closed_form_logsnr(t), rel=1e-9, abs=1e-9)
    alpha, sigma = schedules.seg_alpha_sigma(np.float64(t))
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))
    assert float(alpha) == pytest.approx(math.sqrt(sig(got)), rel=1e-12)
    assert float(sigma) == pytest.approx(math.sqrt(sig(-got)), rel=1e-12)


def test_seg_logsnr_clamped_near_zero():
    # DDP clamps tan^2 at 1e-5 before the log: the log-SNR never exceeds -log(1e-5).
    cap = -math.log(1e-5)
    assert float(schedules.seg_logsnr(np.float64(0.0))) == pytest.approx(cap)
    assert float(schedules.seg_logsnr(np.float64(0.001))) == pytest.approx(cap)
    assert _closed_form_logsnr(0.0) > cap  # the clamp is active there


def test_seg_alpha_sigma_properties():
    t = np.linspace(0.0, 0.999, 1000)
    logsnr = schedules.seg_logsnr(t)
    alpha, sigma = schedules.seg_alpha_sigma(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-12)
    assert np.all(np.diff(logsnr) <= 0) and logsnr[0] > 11 and logsnr[-1] < -7
    assert np.all(np.diff(alpha) <= 0) and np.all(np.diff(sigma) >= 0)
    # Strictly monotone where the clamp is inactive.
    assert np.all(np.diff(logsnr[2:]) < 0)
    # The jnp path (training on device) agrees with the host float64 path.
    a32, s32 = schedules.seg_alpha_sigma(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(a32), alpha, atol=2e-6)
    np.testing.assert_allclose(np.asarray(s32), sigma, atol=2e-6)


def test_seg_time_shares_the_step_index():
    np.testing.assert_allclose(
        schedules.seg_time(np.array([999, 981, 500, 1, 0, -1])),
        [0.999, 0.981, 0.5, 0.001, 0.0, 0.0],
    )
