"""Loss pieces: label downsampling, the ignore index, and stage seg's zeroed bridge."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

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
        return losses.compute_loss(nnx.merge(graphdef, p), batch, jax.random.key(0),
                                   loss_cfg)[1]["loss_seg"]

    bigger = jax.tree.map(lambda x: x * 3.0, params["bridge"])
    assert float(seg_loss(params)) == float(seg_loss({**params, "bridge": bigger}))
    z, s = jnp.ones((1, 4, 4, 4)), jnp.ones((1, 4, 4, cfg.segdm.embed_dim))
    i_t, _ = nnx.merge(graphdef, params).bridge(z, s, jnp.array([500]))
    assert float(jnp.abs(i_t).max()) > 0   # the bridge itself is not silent
