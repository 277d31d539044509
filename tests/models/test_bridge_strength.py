"""segsr_jax.evaluation.bridge_strength: the RMS of C_t against the LQ latent's."""

import dataclasses

import jax
import numpy as np
import pytest

from segsr_jax.evaluation.bridge_strength import bridge_strength
from tests.tiny_segsr import K, tiny_model


def _batch(seed=0, b=2, s=16):
    r = np.random.default_rng(seed)
    hr = r.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
    lq = hr[:, ::2, ::2]
    labels = r.integers(0, K, (b, s, s), dtype=np.uint8)
    return hr, lq, labels


def test_shut_bridge_measures_zero_and_an_opened_one_does_not():
    model = tiny_model()
    hr, lq, labels = _batch()
    shut = bridge_strength(model, hr, lq, labels, timesteps=(900, 100))
    assert shut["lq_latent_rms"] > 0
    assert shut["c_t_rms"] == {900: 0.0, 100: 0.0}  # zero-initialised heads, as before training
    head = model.bridge.c_out
    head.kernel[...] = jax.random.normal(jax.random.key(1), head.kernel.shape) * 0.1
    opened = bridge_strength(model, hr, lq, labels, timesteps=(900, 100))
    assert opened["lq_latent_rms"] == pytest.approx(shut["lq_latent_rms"])
    assert all(v > 1e-3 for v in opened["c_t_rms"].values())
    # The fixed prior feeds the LQ segmenter's map, not the labels: another message.
    fixed = bridge_strength(model, hr, lq, labels, timesteps=(900, 100), prior="fixed")
    assert fixed["c_t_rms"][100] != pytest.approx(opened["c_t_rms"][100], rel=1e-3)
    # Labels matter at low noise (S_t close to their embedding).
    other = bridge_strength(model, hr, lq, (labels + 1) % K, timesteps=(100,))
    assert other["c_t_rms"][100] != pytest.approx(opened["c_t_rms"][100], rel=1e-3)
    # A bridge that reads SegDM's estimate is measured on that estimate, not on S_t.
    est = _with_seg_source(model, "estimate")
    on_est = bridge_strength(est, hr, lq, labels, timesteps=(900,))
    assert on_est["c_t_rms"][900] != pytest.approx(opened["c_t_rms"][900], rel=1e-3)
    est_fixed = bridge_strength(est, hr, lq, labels, timesteps=(900, 100), prior="fixed")
    assert est_fixed["c_t_rms"] == pytest.approx(fixed["c_t_rms"])  # no SegDM: the map itself


def _with_seg_source(model, source):
    from flax import nnx

    from segsr_jax.models.segsr import SegSR

    cfg = model.config
    cfg = dataclasses.replace(cfg, bridge=dataclasses.replace(cfg.bridge, seg_source=source))
    out = SegSR(cfg, rngs=nnx.Rngs(0))
    nnx.update(out, nnx.state(model))
    return out


def test_unknown_prior_is_refused():
    hr, lq, labels = _batch()
    with pytest.raises(ValueError, match="prior 'none'"):
        bridge_strength(tiny_model(), hr, lq, labels, prior="none")
