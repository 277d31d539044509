"""Tile plans cover the latent, blending inverts extraction, weights are SeeSR's Gaussian."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segsr_jax.diffusion.tiling import blend_tiles, extract_tiles, gaussian_weights, plan_tiles

PLANS = [
    (64, 64, 96, 32),
    (96, 96, 96, 4),
    (97, 200, 96, 4),
    (130, 75, 64, 32),
    (33, 250, 16, 12),
    (5, 300, 48, 8),
    (1, 1, 8, 2),
]


@pytest.mark.parametrize("h,w,tile,overlap", PLANS)
def test_plan_covers_every_pixel_with_fixed_tiles(h, w, tile, overlap):
    plan = plan_tiles(h, w, tile, overlap)
    th, tw = plan.tile
    assert plan.tile == (min(tile, h), min(tile, w)) and plan.shape == (h, w)
    cover = np.zeros((h, w), int)
    for y, x in plan.origins:
        assert 0 <= y <= h - th and 0 <= x <= w - tw
        cover[y : y + th, x : x + tw] += 1
    assert cover.min() >= 1
    # Neighbouring windows overlap by at least `overlap`, and no more windows than needed.
    for starts, size, t in [
        (sorted({y for y, _ in plan.origins}), h, th),
        (sorted({x for _, x in plan.origins}), w, tw),
    ]:
        assert starts[0] == 0 and starts[-1] == size - t
        assert all(t - (b - a) >= min(overlap, t) for a, b in zip(starts, starts[1:], strict=False))
        if len(starts) > 1:
            assert len(starts) - 2 < (size - t) / (t - overlap)


def test_small_latent_is_one_whole_tile():
    plan = plan_tiles(40, 56, 96, 32)
    assert plan.origins == ((0, 0),) and plan.tile == (40, 56)


@functools.partial(jax.jit, static_argnums=1)
def _round_trip(x, plan, weights):
    return blend_tiles(extract_tiles(x, plan), plan, weights)


@pytest.mark.parametrize("h,w,tile,overlap", PLANS)
def test_blend_of_extract_is_identity_for_any_weights(h, w, tile, overlap, np_rng):
    plan = plan_tiles(h, w, tile, overlap)
    x = jnp.asarray(np_rng.standard_normal((2, h, w, 3)).astype(np.float32))
    for weights in [
        gaussian_weights(plan.tile),
        np_rng.uniform(0.01, 5.0, plan.tile).astype(np.float32),
    ]:
        out = _round_trip(x, plan, jnp.asarray(weights))
        assert out.shape == x.shape and out.dtype == x.dtype
        # Exact up to float32 rounding of sum(w x) / sum(w).
        np.testing.assert_allclose(np.asarray(out), np.asarray(x), rtol=1e-6, atol=1e-6)


def test_blend_weighs_overlapping_tiles():
    plan = plan_tiles(4, 6, 4, 2)  # two windows side by side: x = 0 and x = 2
    assert plan.origins == ((0, 0), (0, 2))
    weights = np.tile(np.array([1.0, 2.0, 3.0, 4.0], np.float32), (4, 1))
    tiles = jnp.stack([jnp.full((1, 4, 4, 1), 10.0), jnp.full((1, 4, 4, 1), 20.0)])
    row = np.asarray(blend_tiles(tiles, plan, weights))[0, 0, :, 0]
    # Columns 2, 3 see window 0 at its columns 2, 3 and window 1 at its columns 0, 1.
    np.testing.assert_allclose(
        row, [10, 10, (3 * 10 + 1 * 20) / 4, (4 * 10 + 2 * 20) / 6, 20, 20], rtol=1e-6
    )


def test_extract_shapes_are_static_and_compile_once(np_rng):
    plan = plan_tiles(100, 70, 32, 8)
    traces = []

    @functools.partial(jax.jit, static_argnums=1)
    def f(x, plan):
        traces.append(1)
        return extract_tiles(x, plan)

    for _ in range(2):
        out = f(jnp.asarray(np_rng.standard_normal((1, 100, 70, 4)), jnp.float32), plan)
    assert out.shape == (len(plan), 1, 32, 32, 4) and len(traces) == 1
    # An equal plan made again hashes equal: no retrace either.
    f(jnp.zeros((1, 100, 70, 4)), plan_tiles(100, 70, 32, 8))
    assert len(traces) == 1


def test_program_size_does_not_grow_with_tile_count():
    def eqns(plan):
        x = jnp.zeros((1, *plan.shape, 4))
        fn = lambda x: blend_tiles(extract_tiles(x, plan), plan, jnp.ones(plan.tile))
        return len(jax.make_jaxpr(fn)(x).jaxpr.eqns)

    few, many = plan_tiles(40, 40, 32, 8), plan_tiles(300, 300, 16, 12)
    assert len(few) == 4 and len(many) > 1000
    assert eqns(few) == eqns(many)


def test_gaussian_weights_are_seesrs():
    w = gaussian_weights((6, 10))
    assert w.shape == (6, 10) and w.dtype == np.float32 and np.all(w > 0)
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)  # symmetric about the centre
    # SeeSR's profile: exp(-(x - mid)^2 / W^2 / (2 * 0.01)), up to its constant factor.
    width = 10
    x = np.arange(width)
    seesr = np.exp(-((x - (width - 1) / 2) ** 2) / width**2 / (2 * 0.01))
    np.testing.assert_allclose(w[2] / w[2].max(), seesr / seesr.max(), rtol=1e-5)
    # A narrower sigma concentrates the weight towards the centre.
    assert gaussian_weights(10, 0.05)[0, 0] < gaussian_weights(10, 0.1)[0, 0]


def test_tiling_errors():
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(64, 64, 32, 32)
    with pytest.raises(ValueError, match="empty"):
        plan_tiles(0, 64, 32, 8)
    plan = plan_tiles(64, 64, 32, 8)
    with pytest.raises(ValueError, match="does not match the plan"):
        extract_tiles(jnp.zeros((1, 60, 64, 4)), plan)
    tiles = extract_tiles(jnp.zeros((1, 64, 64, 4)), plan)
    with pytest.raises(ValueError, match="weights shape"):
        blend_tiles(tiles, plan, np.ones((16, 16)))
    with pytest.raises(ValueError, match="do not match the plan"):
        blend_tiles(tiles[1:], plan, np.ones((32, 32)))
