"""The design variants in which the bridge's segmentation stream enters every UNet level
(``BridgeConfig.level_channels``: zero at the start, wired into every residual and both CFG
halves, off when C_t is off, checked against the ControlNet, grown onto a checkpoint that
lacks it) and reads SegDM's clean estimate (``BridgeConfig.seg_source``)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import aliased
from segsr_jax import checkpoint
from segsr_jax.models.controlnet import residual_channels
from segsr_jax.models.segsr import SegSR, SegSRConfig
from segsr_jax.training.state import NEW_ZERO_HEADS
from tests.tiny_segsr import tiny_config, tiny_model

B, H, W = 2, 8, 8


def _levels_config() -> SegSRConfig:
    cfg = tiny_config()
    bridge = dataclasses.replace(cfg.bridge, level_channels=residual_channels(cfg.controlnet))
    return dataclasses.replace(cfg, bridge=bridge)


def _levels_model(plain: SegSR) -> SegSR:
    """A levels model whose other weights are ``plain``'s."""
    model = SegSR(_levels_config(), rngs=nnx.Rngs(jax.random.key(1, impl="rbg")))
    nnx.update(model, nnx.state(plain))
    return model


def _inputs():
    ks = jax.random.split(jax.random.key(0), 5)
    c = tiny_config()
    z_t = jax.random.normal(ks[0], (B, H, W, 4))
    s_t = jax.random.normal(ks[1], (B, H, W, c.segdm.embed_dim))
    z_lq = jax.random.normal(ks[2], (B, H, W, 4))
    f_lq = jax.random.normal(ks[3], (B, H, W, c.segdm.feat_channels))
    ctx = jax.random.normal(ks[4], (2, B, 3, c.text.hidden_size))
    return z_t, s_t, z_lq, f_lq, ctx[0], ctx[1]


def _denoise(model, **kw):
    return np.asarray(_denoise_traced(model, **kw))


def _denoise_traced(model, *, use_bridge=(True, True), uncond=None, scale=1.0, context=None):
    z_t, s_t, z_lq, f_lq, ctx, _ = _inputs()
    out, _ = model.denoise(
        z_t,
        s_t,
        jnp.array(500),
        jnp.array(0.5),
        z_lq,
        f_lq,
        ctx if context is None else context,
        uncond,
        scale,
        use_bridge=use_bridge,
    )
    return out


def _open_heads(model, only=None):
    for i, head in enumerate(model.bridge.level_out):
        if only is None or i == only:
            k = jax.random.normal(jax.random.key(10 + i), head.kernel.shape)
            head.kernel[...] = k * 0.5


def test_levels_start_at_zero_and_reach_every_residual():
    plain = tiny_model(0)
    base = _denoise(plain)
    model = _levels_model(plain)
    # Fresh zero heads: exactly the model without them.
    np.testing.assert_array_equal(_denoise(model), base)
    n = len(model.bridge.level_out)
    assert n == len(residual_channels(model.config.controlnet)) == 5  # 4 skips + mid
    # Every head moves the output (the gradient is not zero at zero weights): every level is
    # wired into the UNet.
    w = jax.random.normal(jax.random.key(5), base.shape)
    heads = nnx.All(nnx.Param, nnx.PathContains("level_out"))
    grads = nnx.grad(
        lambda m: jnp.sum(jnp.asarray(_denoise_traced(m)) * w), argnums=nnx.DiffState(0, heads)
    )(model)
    for i in range(n):
        g = grads["bridge"]["level_out"][i]["kernel"][...]
        assert float(jnp.abs(g).max()) > 1e-6, i
    # Off with C_t (arm sronly, seg prior "none"): the plain model's output.
    _open_heads(model)
    np.testing.assert_array_equal(
        _denoise(model, use_bridge=(False, True)), _denoise(plain, use_bridge=(False, True))
    )


def test_levels_reach_both_halves_of_cfg():
    model = _levels_model(tiny_model(0))
    _open_heads(model)
    _, _, _, _, ctx, unc = _inputs()
    cond, uncond = _denoise(model), _denoise(model, context=unc)
    guided = _denoise(model, uncond=unc, scale=3.0)
    np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), atol=2e-4)


def test_level_channels_must_match_the_controlnet():
    cfg = tiny_config()
    bad = dataclasses.replace(cfg.bridge, level_channels=(16, 16))
    with pytest.raises(ValueError, match="level_channels"):
        dataclasses.replace(cfg, bridge=bad)
    # Round trip through the checkpoint config.
    good = _levels_config()
    assert SegSRConfig.from_dict(good.to_dict()).bridge.level_channels == (16, 16, 16, 32, 32)


def test_levels_grow_onto_a_checkpoint_without_them(tmp_path):
    plain = tiny_model(3)
    checkpoint.save_model(tmp_path / "ck", plain, {"model": plain.config.to_dict()})
    build = lambda _: SegSR(_levels_config(), rngs=nnx.Rngs(0))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="bridge/level_out"):
        checkpoint.restore_model(tmp_path / "ck", build)
    grown, _ = checkpoint.restore_model(
        tmp_path / "ck", build, may_lack=lambda p: p.startswith(NEW_ZERO_HEADS)
    )
    for head in grown.bridge.level_out:
        assert not np.any(np.asarray(head.kernel[...])) and not np.any(np.asarray(head.bias[...]))
    saved = nnx.to_flat_state(nnx.state(plain))
    got = dict(nnx.to_flat_state(nnx.state(grown)))
    for path, var in saved:
        np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(var[...]))
    # Any other missing parameter is still an error.
    with pytest.raises(checkpoint.CheckpointMismatchError, match="missing"):
        checkpoint.restore_model(
            tmp_path / "ck", build, may_lack=lambda p: p.startswith("bridge/level_out/0/")
        )


def test_aliased_levels_configs():
    for arm in ("prior", "joint"):
        c = aliased.get_config(f"{arm}+levels")
        model = SegSRConfig.from_dict(c.model.to_dict())
        assert model.bridge.level_channels == residual_channels(model.controlnet)
        assert c.train.stage == aliased.get_config(arm).train.stage
    assert not SegSRConfig.from_dict(
        aliased.get_config("joint").model.to_dict()
    ).bridge.level_channels
    est = SegSRConfig.from_dict(aliased.get_config("joint+estimate").model.to_dict())
    assert est.bridge.seg_source == "estimate" and est.bridge.level_channels
    for bad in ("sronly+levels", "prior+estimate"):
        with pytest.raises(ValueError, match="variants"):
            aliased.get_config(bad)


def test_seg_stream_reads_segdms_estimate():
    """``seg_source="estimate"``: SRDM's output is the "state" model's given SegDM's
    re-embedded soft estimate (divided by the embedding's scale) as the state; SegDM itself
    still reads the noisy state."""
    state_model = _levels_model(tiny_model(0))
    _open_heads(state_model)
    c_out = state_model.bridge.c_out
    c_out.kernel[...] = jax.random.normal(jax.random.key(2), c_out.kernel.shape) * 0.5
    cfg = state_model.config
    est_cfg = dataclasses.replace(
        cfg, bridge=dataclasses.replace(cfg.bridge, seg_source="estimate")
    )
    est = SegSR(est_cfg, rngs=nnx.Rngs(jax.random.key(1, impl="rbg")))
    nnx.update(est, nnx.state(state_model))
    z_t, s_t, z_lq, f_lq, ctx, _ = _inputs()
    t, t_seg = jnp.array(500), jnp.array(0.5)
    i_t, _, _ = state_model.bridge.encode(z_t, s_t, t)
    logits = state_model.segdm(s_t, t_seg, f_lq, i_t)
    s_hat = state_model.segdm.embed_probs(jax.nn.softmax(logits, axis=-1))
    s_hat = s_hat / cfg.segdm.bit_scale  # at unit scale, like S_t's noise
    out, seg = est.denoise(z_t, s_t, t, t_seg, z_lq, f_lq, ctx)
    want, _ = state_model.denoise(z_t, s_hat, t, t_seg, z_lq, f_lq, ctx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(seg), np.asarray(logits), atol=1e-5)
    plain_out, _ = state_model.denoise(z_t, s_t, t, t_seg, z_lq, f_lq, ctx)
    assert np.abs(np.asarray(out) - np.asarray(plain_out)).max() > 1e-5
    # The fixed prior (no SegDM coupling) reads its map as before.
    fixed = dict(use_bridge=(True, False))
    np.testing.assert_array_equal(
        np.asarray(est.denoise(z_t, s_t, t, t_seg, z_lq, f_lq, ctx, **fixed)[0]),
        np.asarray(state_model.denoise(z_t, s_t, t, t_seg, z_lq, f_lq, ctx, **fixed)[0]),
    )
    with pytest.raises(ValueError, match="seg_source"):
        dataclasses.replace(cfg, bridge=dataclasses.replace(cfg.bridge, seg_source="clean"))
