"""Loss pieces: label downsampling, the ignore index, and stage seg's zeroed bridge."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from segsr_jax.lpips import LPIPS, lpips_params
from segsr_jax.training import losses
from tests.training.test_step import _batch
from tests.training.tiny_train_config import model_config, random_params


def test_labels_at_latent_resolution_take_block_centres():
    y = jnp.arange(64, dtype=jnp.uint8).reshape(1, 8, 8)
    got = losses.labels_at(y, 4)
    np.testing.assert_array_equal(got, [[[18, 22], [50, 54]]])
    assert got.dtype == jnp.int32


def test_cross_entropy_ignores_255():
    logits = jnp.array([[[2.0, 0.0], [0.0, 5.0], [9.0, -9.0]]])
    labels = jnp.array([[0, 1, 255]])
    want = optax.softmax_cross_entropy_with_integer_labels(logits[:, :2], labels[:, :2]).mean()
    np.testing.assert_allclose(losses.masked_cross_entropy(logits, labels), want, rtol=1e-6)
    assert losses.masked_cross_entropy(logits, jnp.full((1, 3), 255)) == 0.0


def test_pixels_and_lq_upsampling():
    x = jnp.array([[0, 255]], jnp.uint8)
    np.testing.assert_allclose(losses.to_unit_range(x), [[-1.0, 1.0]])
    assert losses.upsample_lq(jnp.zeros((2, 4, 4, 3)), (16, 16)).shape == (2, 16, 16, 3)


def test_stage_seg_zeroes_the_bridge():
    """I_t = 0 in stage seg: a trained (non-zero) bridge does not change the seg loss."""
    cfg = model_config()
    graphdef, params = random_params()
    loss_cfg = losses.LossConfig(stage="seg")
    batch = {k: v[:2] for k, v in _batch().items()}

    @jax.jit
    def seg_loss(p):
        return losses.compute_loss(nnx.merge(graphdef, p), batch, jax.random.key(0), loss_cfg)[1][
            "loss_seg"
        ]

    bigger = jax.tree.map(lambda x: x * 3.0, params["bridge"])
    assert float(seg_loss(params)) == float(seg_loss({**params, "bridge": bigger}))
    z, s = jnp.ones((1, 4, 4, 4)), jnp.ones((1, 4, 4, cfg.segdm.embed_dim))
    i_t, _ = nnx.merge(graphdef, params).bridge(z, s, jnp.array([500]))
    assert float(jnp.abs(i_t).max()) > 0  # the bridge itself is not silent


def test_stage_prior_feeds_the_fixed_segmenter_map_and_trains_the_bridge():
    """Stage prior: SegDM plays no part, the bridge gets gradients through C_t, and the loss
    depends on SegFormer's LQ prediction (the fixed prior) rather than on the labels."""
    graphdef, params = random_params()
    batch = {k: v[:2] for k, v in _batch().items()}
    cfg = losses.LossConfig(stage="prior")

    def loss(p, b=batch):
        return losses.compute_loss(nnx.merge(graphdef, p), b, jax.random.key(0), cfg)[0]

    bridge = jax.tree.map(lambda x: x + 0.05, params["bridge"])  # open the zero heads
    p = {**params, "bridge": bridge}
    grads = jax.jit(jax.grad(loss))(p)
    assert float(optax.tree.norm(grads["bridge"])) > 0
    # SegDM's denoiser plays no part (only its label embedding, which embeds the fixed map).
    denoiser = {k: v for k, v in grads["segdm"].items() if k != "label_embedding"}
    assert float(optax.tree.norm(denoiser)) == 0.0
    other_labels = dict(batch, label=(batch["label"] + 1) % 8)
    assert float(jax.jit(loss)(p)) == float(jax.jit(lambda q: loss(q, other_labels))(p))
    seg = jax.tree.map(lambda x: x * 1.5, params["segformer"])
    assert float(jax.jit(loss)(p)) != float(jax.jit(loss)({**p, "segformer": seg}))


def test_stage_segmenter_scores_segformer_on_hr():
    graphdef, params = random_params()
    batch = {k: v[:2] for k, v in _batch().items()}
    cfg = losses.LossConfig(stage="segmenter")
    loss, metrics = jax.jit(
        lambda p: losses.compute_loss(nnx.merge(graphdef, p), batch, jax.random.key(0), cfg)
    )(params)
    k = model_config().segformer.num_labels
    assert 0.5 * np.log(k) < float(loss) < 3 * np.log(k)  # near chance for random weights
    assert 0.0 <= float(metrics["pixel_accuracy"]) <= 1.0
    ignored = dict(batch, label=np.full_like(batch["label"], 255))
    assert (
        float(losses.compute_loss(nnx.merge(graphdef, params), ignored, jax.random.key(0), cfg)[0])
        == 0.0
    )


def test_stage_decoder_adds_lpips_of_the_reconstruction_to_l1():
    """Stage decoder: loss = L1 + w * LPIPS(decode(encode(hr)), hr); the encoder gets no
    gradient, the LPIPS term is LPIPS's own distance and changes the decoder's gradient."""
    graphdef, params = random_params()
    batch = {"hr": _batch()["hr"][:2]}
    metric = LPIPS(rngs=nnx.Rngs(3))
    lp = lpips_params(metric)

    def loss(p, w):
        cfg = losses.LossConfig(stage="decoder", perceptual_weight=w)
        return losses.compute_loss(nnx.merge(graphdef, p), batch, jax.random.key(0), cfg, lp)

    (total, m), grads = jax.jit(jax.value_and_grad(lambda p: loss(p, 1.0), has_aux=True))(params)
    model = nnx.merge(graphdef, params)
    x = losses.to_unit_range(batch["hr"])
    recon = model.vae.decode_latent(model.vae.encode_latent(x, jax.random.key(0)))
    np.testing.assert_allclose(m["lpips"], jnp.mean(metric(recon, x)), rtol=1e-5)
    np.testing.assert_allclose(m["loss_recon"], jnp.mean(jnp.abs(recon - x)), rtol=1e-5)
    np.testing.assert_allclose(total, m["loss_recon"] + m["lpips"], rtol=1e-6)
    assert float(m["lpips"]) > 1e-3
    assert float(optax.tree.norm(grads["vae"]["encoder"])) == 0.0

    def l1(p):  # the L1 term alone, written out (no LPIPS network to compile a second time)
        m = nnx.merge(graphdef, p)
        return jnp.mean(jnp.abs(m.vae.decode_latent(m.vae.encode_latent(x, jax.random.key(0))) - x))

    l1_only = jax.jit(jax.grad(l1))(params)
    diff = jax.tree.map(jnp.subtract, grads["vae"]["decoder"], l1_only["vae"]["decoder"])
    assert float(optax.tree.norm(diff)) > 1e-3 * float(optax.tree.norm(l1_only["vae"]["decoder"]))
    with pytest.raises(ValueError, match="LPIPS"):
        losses.compute_loss(
            model, batch, jax.random.key(0), losses.LossConfig(stage="decoder"), None
        )


def test_seg_rollout_shows_segdm_the_samplers_state_not_the_hr_scene():
    """seg_rollout_steps: SegDM's inputs come from the model's own sampler on the LQ, so its
    loss no longer depends on the HR crop (it did through I_t), while SRDM's loss is the same
    as without the option; the bridge still gets a gradient from SegDM's loss."""
    graphdef, params = random_params()
    batch = {k: v[:2] for k, v in _batch().items()}
    other_hr = dict(batch, hr=255 - batch["hr"])

    def terms(p, b, k):
        cfg = losses.LossConfig(stage="joint", seg_rollout_steps=k)
        return losses.compute_loss(nnx.merge(graphdef, p), b, jax.random.key(0), cfg)[1]

    run = jax.jit(terms, static_argnums=2)
    plain, rolled = run(params, batch, 0), run(params, batch, 2)
    assert float(plain["loss_sr"]) == pytest.approx(float(rolled["loss_sr"]), rel=1e-6)
    assert float(plain["loss_seg"]) != float(rolled["loss_seg"])
    assert float(run(params, other_hr, 0)["loss_seg"]) != float(plain["loss_seg"])
    assert float(run(params, other_hr, 2)["loss_seg"]) == float(rolled["loss_seg"])

    def seg_loss(p):
        return terms(p, batch, 2)["loss_seg"]

    grads = jax.jit(jax.grad(seg_loss))(params)
    assert float(optax.tree.norm(grads["bridge"])) > 0
    assert float(optax.tree.norm(grads["unet"])) == 0.0  # the rollout is not differentiated


def test_seg_rollout_is_the_sampler():
    """sampled_state's latent is what ``sampling.sample`` returns for the same LQ and key."""
    from segsr_jax.diffusion import plans, samplers, sampling
    from segsr_jax.diffusion.schedules import NoiseConfig

    graphdef, params = random_params()
    model = nnx.merge(graphdef, params)
    lq = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    ctx = model.encode_prompts(jnp.zeros((2, 8), jnp.int32))
    noise = NoiseConfig(prediction_type=model.config.prediction_type)
    key = jax.random.key(3)
    z, probs = jax.jit(losses.sampled_state, static_argnums=(3, 4))(model, lq, ctx, 3, noise, key)
    plan = plans.make_plan((32, 32), model.config.latent_factor, guidance=False, color_fix="none")
    out = sampling.sample(model, plan, lq, ctx, None, 1.0, samplers.make_schedule("ddim", 3), key)
    np.testing.assert_allclose(z, out.latent, atol=1e-5)
    conds = sampling.lq_conditions(model, plan, lq)  # what the loss hands it, computed once
    z2, _ = jax.jit(losses.sampled_state, static_argnums=(3, 4))(
        model, lq, ctx, 3, noise, key, conds
    )
    np.testing.assert_allclose(z2, out.latent, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs.shape == (*z.shape[:3], model.config.segdm.num_classes)


def test_seg_rollout_needs_the_joint_stage():
    with pytest.raises(ValueError, match="joint"):
        losses.LossConfig(stage="sr", seg_rollout_steps=2)
    with pytest.raises(ValueError, match=">= 0"):
        losses.LossConfig(stage="joint", seg_rollout_steps=-1)


def _scan_inputs(jaxpr) -> list[int]:
    """The input count of every ``scan`` in ``jaxpr``, nested programs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(len(eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _scan_inputs(inner)
    return found


def test_seg_rollout_scan_carries_no_tangents():
    """Under differentiation the rollout's scan takes exactly the inputs it takes without:
    no parameter tangent enters it, so it is never differentiated as a whole after tracing
    (on a GPU that reached cuDNN attention's backward rule, which rejects the 77-token
    cross-attention: benchmarks/RESULTS.md, the H200 training step)."""
    graphdef, params = random_params()
    batch = {k: v[:2] for k, v in _batch().items()}
    cfg = losses.LossConfig(stage="joint", seg_rollout_steps=2)

    def seg_loss(p):
        return losses.compute_loss(nnx.merge(graphdef, p), batch, jax.random.key(0), cfg)[1][
            "loss_seg"
        ]

    plain = _scan_inputs(jax.make_jaxpr(seg_loss)(params).jaxpr)
    assert len(plain) == 1  # the rollout
    jvp = jax.make_jaxpr(lambda p, t: jax.jvp(seg_loss, (p,), (t,)))(params, params).jaxpr
    grad = jax.make_jaxpr(jax.grad(seg_loss))(params).jaxpr
    assert _scan_inputs(jvp) == plain
    assert _scan_inputs(grad) == plain
