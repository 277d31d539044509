"""The samplers against diffusers' schedulers step by step, and scan == Python loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segsr_jax.diffusion import samplers, schedules
from segsr_jax.diffusion.samplers import init_state, make_schedule, seg_step, sr_step
from segsr_jax.diffusion.schedules import NoiseConfig, alphas_cumprod
from segsr_jax.models import guidance
from tests.torch_reference import assert_close_rel, torch

ds = pytest.importorskip("diffusers")

SD = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    steps_offset=1,
)
SHAPE = (2, 4, 6, 5)  # the step is elementwise: any layout works the same


def _reference(sampler, prediction_type, spacing):
    if sampler == "ddpm":
        return ds.DDPMScheduler(
            **SD,
            clip_sample=False,
            variance_type="fixed_small",
            prediction_type=prediction_type,
            timestep_spacing=spacing,
        )
    if sampler == "ddim":
        return ds.DDIMScheduler(
            **SD,
            clip_sample=False,
            set_alpha_to_one=False,
            prediction_type=prediction_type,
            timestep_spacing=spacing,
        )
    return ds.DPMSolverMultistepScheduler(
        **SD,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
    )


@functools.cache
def _jit_step():
    return jax.jit(sr_step)


def _run_parity(sampler, prediction_type, steps, spacing, eta=0.0, seed=0):
    """Both chains from the same start on the same random model outputs and noise; compare
    the sample after every step."""
    ref = _reference(sampler, prediction_type, spacing)
    ref.set_timesteps(steps)
    sched = make_schedule(
        sampler,
        steps,
        NoiseConfig(prediction_type=prediction_type),
        timestep_spacing=spacing,
        eta=eta,
    )
    np.testing.assert_array_equal(sched.timestep, ref.timesteps.numpy())
    assert len(sched) == steps and sched.timestep.dtype == np.int32
    assert sched.stochastic == (sampler == "ddpm" or eta > 0)

    gen = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(SHAPE, generator=gen)
    outs = torch.randn((steps, *SHAPE), generator=gen)
    noises = torch.randn((steps, *SHAPE), generator=gen)
    ddpm_gen = torch.Generator().manual_seed(seed + 1)  # DDPM draws its own noise...
    ddpm_noise = torch.Generator().manual_seed(seed + 1)  # ...which we replay

    state = init_state(jnp.asarray(x_ref.numpy()))
    for i, t in enumerate(ref.timesteps):
        if sampler == "ddpm":
            x_ref = ref.step(outs[i], t, x_ref, generator=ddpm_gen).prev_sample
            noise = torch.randn(SHAPE, generator=ddpm_noise) if t > 0 else torch.zeros(SHAPE)
        elif sampler == "ddim":
            x_ref = ref.step(
                outs[i], t, x_ref, eta=eta, variance_noise=noises[i] if eta > 0 else None
            ).prev_sample
            noise = noises[i]
        else:
            x_ref = ref.step(outs[i], t, x_ref).prev_sample
            noise = noises[i]
        coeffs = jax.tree.map(lambda a, i=i: a[i], sched.sr)
        state = _jit_step()(coeffs, state, jnp.asarray(outs[i].numpy()), jnp.asarray(noise.numpy()))
        assert_close_rel(state.x, x_ref.numpy(), tol=1e-5, what=f"{sampler} step {i} (t={t})")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [50, 20])
def test_ddpm_matches_diffusers(prediction_type, steps):
    _run_parity("ddpm", prediction_type, steps, "leading")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,eta", [(50, 0.0), (20, 0.0), (50, 0.7), (20, 1.0)])
def test_ddim_matches_diffusers(prediction_type, steps, eta):
    _run_parity("ddim", prediction_type, steps, "leading", eta=eta)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [50, 20, 5])
def test_dpmpp_2m_matches_diffusers(prediction_type, steps):
    _run_parity("dpmpp_2m", prediction_type, steps, "linspace")


@pytest.mark.parametrize(
    "sampler,spacing",
    [("ddpm", "trailing"), ("ddim", "linspace"), ("dpmpp_2m", "leading"), ("dpmpp_2m", "trailing")],
)
def test_other_spacings_match_diffusers(sampler, spacing):
    _run_parity(sampler, "epsilon", 20, spacing)


def test_dpmpp_final_step_returns_x0_prediction():
    sched = make_schedule("dpmpp_2m", 10)
    last = jax.tree.map(lambda a: a[-1], sched.sr)
    assert (last.x, last.x0, last.prev_x0) == (0.0, 1.0, 0.0)
    assert sched.sr.prev_x0[0] == 0.0 and np.all(sched.sr.prev_x0[1:-1] != 0.0)


def test_initial_latent_matches_add_noise(np_rng):
    z = np_rng.standard_normal(SHAPE).astype(np.float32)
    eps = np_rng.standard_normal(SHAPE).astype(np.float32)
    ref = (
        ds.DDPMScheduler(**SD)
        .add_noise(torch.from_numpy(z), torch.from_numpy(eps), torch.tensor([999]))
        .numpy()
    )
    got = samplers.initial_latent(jnp.asarray(z), jnp.asarray(eps), alphas_cumprod(NoiseConfig()))
    assert_close_rel(got, ref, tol=1e-5)


def test_seg_step_is_ddp_update(np_rng):
    sched = make_schedule("ddpm", 50, seg_grid="shared")
    s_t = np_rng.standard_normal(SHAPE).astype(np.float32)
    s0 = np_rng.uniform(-0.01, 0.01, SHAPE).astype(np.float32)
    i = 10
    c = jax.tree.map(lambda a: a[i], sched.seg)
    assert c.time == pytest.approx(sched.timestep[i] / 1000)  # the shared grid
    assert c.alpha_next == sched.seg.alpha[i + 1] and c.sigma_next == sched.seg.sigma[i + 1]
    eps = (s_t - c.alpha * s0) / c.sigma
    want = c.alpha_next * s0 + c.sigma_next * eps
    np.testing.assert_allclose(
        np.asarray(seg_step(c, jnp.asarray(s_t), jnp.asarray(s0))), want, rtol=1e-5, atol=1e-6
    )
    # A consistent state S_t = alpha S0 + sigma eps moves to alpha' S0 + sigma' eps.
    consistent = c.alpha * s0 + c.sigma * s_t
    np.testing.assert_allclose(
        np.asarray(seg_step(c, jnp.asarray(consistent), jnp.asarray(s0))),
        c.alpha_next * s0 + c.sigma_next * s_t,
        rtol=1e-4,
        atol=1e-5,
    )


def _scan_sample(sched, x_start, s_start, outs, s0s, noises):
    """A miniature of the lead's scan: SR and seg chains driven by precomputed model outputs."""

    def body(carry, xs):
        state, seg = carry
        s, out, s0, noise = xs
        return (sr_step(s.sr, state, out, noise), seg_step(s.seg, seg, s0)), state.x0

    (state, seg), x0s = jax.lax.scan(
        body, (init_state(x_start), s_start), (sched, outs, s0s, noises)
    )
    return state.x, seg, x0s


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_scan_equals_python_loop(sampler, np_rng):
    steps = 12
    sched = make_schedule(sampler, steps)
    rnd = lambda *s: jnp.asarray(np_rng.standard_normal(s).astype(np.float32))
    x_start, s_start = rnd(*SHAPE), rnd(*SHAPE)
    outs, s0s, noises = rnd(steps, *SHAPE), rnd(steps, *SHAPE) * 0.01, rnd(steps, *SHAPE)

    x_scan, s_scan, _ = jax.jit(_scan_sample)(sched, x_start, s_start, outs, s0s, noises)

    step_sr, step_seg = jax.jit(sr_step), jax.jit(seg_step)
    state, seg = init_state(x_start), s_start
    for i in range(len(sched)):
        s = jax.tree.map(lambda a, i=i: a[i], sched)
        state = step_sr(s.sr, state, outs[i], noises[i])
        seg = step_seg(s.seg, seg, s0s[i])
    np.testing.assert_allclose(np.asarray(x_scan), np.asarray(state.x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s_scan), np.asarray(seg), rtol=1e-5, atol=1e-5)


def test_scan_keeps_bfloat16_carry(np_rng):
    sched = make_schedule("dpmpp_2m", 6)
    x = jnp.asarray(np_rng.standard_normal(SHAPE), jnp.bfloat16)
    outs = jnp.zeros((6, *SHAPE), jnp.bfloat16)
    x_out, s_out, _ = jax.jit(_scan_sample)(sched, x, x, outs, outs, outs)
    assert x_out.dtype == jnp.bfloat16 and s_out.dtype == jnp.bfloat16


def test_make_schedule_errors():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_schedule("euler", 10)
    with pytest.raises(ValueError, match="eta"):
        make_schedule("ddpm", 10, eta=0.5)
    with pytest.raises(ValueError, match="outside"):
        make_schedule("ddim", 1, steps_offset=1000)
    with pytest.raises(ValueError, match="num_steps"):
        make_schedule("ddpm", 0)


def test_guidance_helpers(np_rng):
    assert guidance.uses_guidance(5.5) and not guidance.uses_guidance(1.0)
    x = jnp.asarray(np_rng.standard_normal((2, 3, 3, 4)).astype(np.float32))
    t = jnp.array([981, 981])
    x2, t2 = guidance.double_batch((x, t))
    assert x2.shape == (4, 3, 3, 4) and t2.shape == (2 * 2,)
    (xu, tu), (xc, tc) = guidance.split_batch((x2, t2))
    np.testing.assert_array_equal(np.asarray(xu), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(xc), np.asarray(x))
    eps_u, eps_c = x, x[::-1] * 2.0
    np.testing.assert_allclose(
        np.asarray(guidance.cfg_combine(eps_u, eps_c, 5.5)),
        np.asarray(eps_u + 5.5 * (eps_c - eps_u)),
        rtol=1e-6,
    )
    # Scale 1 is the conditional prediction: why no doubling is needed there.
    np.testing.assert_allclose(
        np.asarray(guidance.cfg_combine(eps_u, eps_c, 1.0)), np.asarray(eps_c), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="even"):
        guidance.split_batch(x[:1])


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_strength_keeps_the_last_steps_and_restarts_multistep_samplers(sampler):
    full = make_schedule(sampler, 20)
    part = make_schedule(sampler, 20, strength=0.3)
    assert samplers.strength_steps(20, 0.3) == 6 == len(part.timestep)
    np.testing.assert_array_equal(part.timestep, full.timestep[-6:])
    # Steps that need no history have the whole schedule's coefficients; a multistep sampler
    # takes a first-order step first, since there is no earlier x0 at the start.
    first = 1 if sampler == "dpmpp_2m" else 0
    for name in ("x0_from_x", "x0_from_out", "x", "x0", "prev_x0", "noise"):
        got, want = getattr(part.sr, name), getattr(full.sr, name)[-6:]
        np.testing.assert_allclose(got[first:], want[first:], rtol=1e-6, atol=1e-9, err_msg=name)
    assert part.sr.prev_x0[0] == 0  # nothing to look back at in the first step
    # The seg process starts where SRDM does; on the shared grid it keeps the tail's times.
    np.testing.assert_allclose(part.seg.time[0], part.timestep[0] / 1000, rtol=1e-6)
    shared = make_schedule(sampler, 20, seg_grid="shared")
    part_shared = make_schedule(sampler, 20, strength=0.3, seg_grid="shared")
    np.testing.assert_allclose(part_shared.seg.alpha, shared.seg.alpha[-6:], rtol=1e-6)
    assert samplers.start_timestep(part, 1000, 0.3) == int(full.timestep[-6])
    assert samplers.start_timestep(full, 1000, 1.0) == 999  # SeeSR's start
    assert len(make_schedule(sampler, 20, strength=0.01).timestep) == 1
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="strength"):
            make_schedule(sampler, 20, strength=bad)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_seg_grid_ddp_spaces_segdm_evenly_and_never_evaluates_it_at_the_cap(sampler):
    """``ddp``: SegDM's times are DDP's sampler grid from the first step's time, ``t0 (n - i)
    / n``, so its last evaluation is at ``t0 / n``; ``shared`` evaluates it at the SR
    timesteps' own times, the last at t = 0.001 for DDPM and DDIM."""
    ddp = make_schedule(sampler, 20)  # the default
    shared = make_schedule(sampler, 20, seg_grid="shared")
    np.testing.assert_array_equal(ddp.timestep, shared.timestep)  # SRDM is untouched
    for name in ("x0_from_x", "x0_from_out", "x", "x0", "prev_x0", "noise"):
        np.testing.assert_array_equal(getattr(ddp.sr, name), getattr(shared.sr, name))
    t0 = min(shared.timestep[0] / 1000, 0.999)
    np.testing.assert_allclose(ddp.seg.time, t0 * (20 - np.arange(20)) / 20, rtol=1e-6)
    np.testing.assert_allclose(shared.seg.time, np.minimum(shared.timestep / 1000, 0.999), 1e-6)
    assert ddp.seg.time[-1] >= 0.04
    # DDPM and DDIM (leading spacing) end at t = 1: the cap; DPM-Solver++'s grid ends at 50.
    assert shared.seg.time[-1] == (0.05 if sampler == "dpmpp_2m" else 0.001)
    # Both start at the same time and chain each step's next time into the following step.
    for g in (ddp.seg, shared.seg):
        assert g.time[0] == ddp.seg.time[0]
        np.testing.assert_allclose(g.alpha_next[:-1], g.alpha[1:], rtol=1e-6)
        np.testing.assert_allclose(g.sigma_next[-1], schedules.seg_alpha_sigma(0.0)[1], 1e-6)
        np.testing.assert_allclose(g.logsnr, schedules.seg_logsnr(g.time), rtol=1e-5, atol=1e-5)
    one, one_shared = make_schedule(sampler, 1), make_schedule(sampler, 1, seg_grid="shared")
    np.testing.assert_array_equal(one.seg.time, one_shared.seg.time)  # one step: one grid
    with pytest.raises(ValueError, match="seg grid 'even'"):
        make_schedule(sampler, 20, seg_grid="even")
