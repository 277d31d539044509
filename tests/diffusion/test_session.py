"""The sampling session every sampler caller shares, its options and the segmentation prior."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from segsr_jax import parallel
from segsr_jax.diffusion.options import SampleOptions, SegPrior
from segsr_jax.inference import Restorer
from segsr_jax.training.validation import Validator
from tests.diffusion.test_sampling import perturb
from tests.tiny_segsr import save_checkpoint, tiny_model


@pytest.fixture(scope="module")
def restorer(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    return Restorer.from_checkpoint(save_checkpoint(path, perturb(tiny_model(0), seed=1)))


def test_seg_prior_decides_the_bridge_and_the_refinement():
    assert SegPrior("diffusion").use_bridge == (True, True) and SegPrior().refined
    assert SegPrior("fixed").use_bridge == (True, False) and not SegPrior("fixed").refined
    assert SegPrior("none").use_bridge == (False, False) and not SegPrior("none").refined
    assert SegPrior.of("fixed") == SegPrior("fixed") and SegPrior.of(SegPrior()) == SegPrior()
    with pytest.raises(ValueError, match="seg_prior 'ddp'"):
        SegPrior("ddp")


def test_options_refuse_what_no_sampler_can_run():
    with pytest.raises(ValueError, match=r"tile overlap 32 must be in \[0, tile 16\)"):
        SampleOptions(tile=16)
    bad_ones = (dict(steps=0), dict(guidance=float("nan")), dict(min_side=-1))
    bad_ones += (dict(strength=0.0), dict(strength=float("nan")), dict(cleaner="esrgan"))
    for bad in bad_ones:
        with pytest.raises(ValueError):
            SampleOptions(**bad)
    with pytest.raises(ValueError, match="seg_prior"):
        SampleOptions(seg_prior="segdm")
    opts = SampleOptions.from_dict({"steps": 3, "every": 10, "tile": 40}, tile=None, seed=7)
    assert (opts.steps, opts.tile, opts.seed) == (3, 40, 7)


def test_session_compiles_once_per_shape(restorer):
    opts = restorer.options(steps=1, guidance=1.0)
    lq = np.zeros((8, 12, 3), np.uint8)
    _, first = restorer.restore_batch([lq, lq], (16, 24), opts)
    _, again = restorer.restore_batch([lq + 1, lq], (16, 24), opts)
    _, reseeded = restorer.restore_batch([lq, lq], (16, 24), dataclasses.replace(opts, seed=3))
    assert first > 0 and again == 0 and reseeded == 0  # the seed is an argument


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_restorer_and_validator_sample_alike(restorer, guidance):
    """The same model, options and LQ batch give the same SR images and labels through the
    Restorer (inference) and the Validator (training's grid): one sampling session."""
    n, hw = jax.device_count(), (16, 24)  # the validator splits its batch over every device
    rng = np.random.default_rng(0)
    lq = rng.integers(0, 256, (n, 4, 6, 3), dtype=np.uint8)
    hr = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
    opts = restorer.options(steps=2, sampler="ddim", guidance=guidance, prompt="a", seed=4)
    latent = max(-(-s // restorer.config.latent_factor) for s in hw)
    whole = dataclasses.replace(opts, tile=latent, tile_overlap=0, tiles_per_call=1)
    results, _ = restorer.restore_batch(list(lq), hw, whole)

    mesh = parallel.make_mesh()
    batch = {"hr": hr, "lq": lq, "label": np.zeros((n, *hw), np.uint8)}
    validator = Validator(restorer.graphdef, restorer.config, batch, restorer.tokenizer, opts, mesh)
    grid = validator(jax.device_put(restorer.state, parallel.replicated(mesh)))
    h, w = hw
    for i, (sr, _labels) in enumerate(results):
        np.testing.assert_array_equal(grid[i * h : (i + 1) * h, w : 2 * w], sr)


def test_strength_runs_the_last_steps_from_the_noised_lq(restorer):
    """A strength below 1 runs only the last steps of the schedule, starting from the LQ
    latent, and the LQ segmenter's map, noised to the first of them; strength 1 starts from
    SeeSR's t = 999."""
    from segsr_jax.diffusion import geometry, sampling
    from segsr_jax.diffusion.schedules import NoiseConfig, alphas_cumprod, seg_alpha_sigma, seg_time

    rng = np.random.default_rng(0)
    lq = rng.integers(0, 256, (1, 16, 24, 3), dtype=np.uint8)
    batch = jax.numpy.asarray(geometry.model_input(list(lq), (32, 48), 4))
    opts = restorer.options(steps=10, sampler="ddim", guidance=1.0, seed=1)
    model = nnx.merge(restorer.graphdef, restorer.state)
    ctx = jax.numpy.zeros((1, 77, model.config.text.hidden_size))
    for strength, steps in ((1.0, 10), (0.2, 2)):
        o = dataclasses.replace(opts, strength=strength)
        out, _ = restorer.session.run(restorer.state, batch, o, record_labels=True)
        assert out.trajectory.shape[1] == steps
        schedule, plan = restorer.session.schedule(o), restorer.session.plan((32, 48), o)
        assert plan.t_start == (999 if strength == 1 else int(schedule.timestep[0]))
        prepare = jax.jit(
            lambda st, p=plan: sampling._prepare(
                nnx.merge(restorer.graphdef, st), p, batch, ctx, None, 1.0, jax.random.key(0)
            )
        )
        cond, carry, lq_labels = prepare(restorer.state)
        a = float(alphas_cumprod(NoiseConfig())[plan.t_start])
        z_noise = np.asarray(carry.sr.x - a**0.5 * cond.z_lq)
        assert abs(z_noise.std() / (1 - a) ** 0.5 - 1) < 0.15, (strength, z_noise.std())
        alpha, sigma = seg_alpha_sigma(seg_time(plan.t_start))
        s_noise = np.asarray(
            carry.s_t - (strength < 1) * alpha * model.segdm.embed_labels(lq_labels)
        )
        assert abs(s_noise.std() / (sigma if strength < 1 else 1.0) - 1) < 0.15, strength
