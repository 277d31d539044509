"""SegDM and the Dual-Modality Bridge: embeddings, zero-initialised coupling, learnability."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from segsr_jax.models.bridge import Bridge, BridgeConfig
from segsr_jax.models.segdm import IGNORE_INDEX, SegDM, SegDMConfig

SEG = SegDMConfig(
    num_classes=5,
    embed_dim=8,
    feat_channels=6,
    cond_channels=3,
    hidden_channels=16,
    num_blocks=2,
    attention_blocks=(1,),
    num_heads=2,
    norm_groups=4,
)
BRIDGE = BridgeConfig(
    latent_channels=4,
    seg_channels=8,
    hidden_channels=16,
    num_blocks=2,
    c_channels=4,
    i_channels=3,
    norm_groups=4,
)


def _inputs(seed=0, b=2, h=8, w=6):
    r = np.random.default_rng(seed)
    return (
        jnp.asarray(r.standard_normal((b, h, w, 8)), jnp.float32),
        jnp.asarray(r.standard_normal((b, h, w, 6)), jnp.float32),
        jnp.asarray(r.standard_normal((b, h, w, 3)), jnp.float32),
        jnp.asarray(r.standard_normal((b, h, w, 4)), jnp.float32),
    )


def test_label_embedding_scale_ignore_and_soft_embedding():
    model = SegDM(SEG, rngs=nnx.Rngs(0))
    labels = jnp.array([[[0, 1, 4], [IGNORE_INDEX, 2, 3]]])
    s0 = model.embed_labels(labels)
    assert s0.shape == (1, 2, 3, 8)
    assert float(jnp.abs(s0).max()) <= SEG.bit_scale  # (sigmoid*2-1) in (-1, 1)
    table = model.embedding_table()
    np.testing.assert_array_equal(s0[0, 1, 0], table[SEG.num_classes])  # ignore row
    onehot = jax.nn.one_hot(jnp.where(labels == IGNORE_INDEX, 0, labels), SEG.num_classes)
    soft = model.embed_probs(onehot)
    want = model.embed_labels(jnp.where(labels == IGNORE_INDEX, 0, labels))
    np.testing.assert_allclose(soft, want, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 0.0), (jnp.bfloat16, 5e-2)])
def test_segdm_shapes_and_dtype(dtype, tol):
    s_t, f, i_t, _ = _inputs()
    m32 = SegDM(SEG, rngs=nnx.Rngs(1))
    out32 = m32(s_t, jnp.array([0.1, 0.9]), f, i_t)
    assert out32.shape == (2, 8, 6, 5) and out32.dtype == jnp.float32
    m = SegDM(SEG, dtype=dtype, rngs=nnx.Rngs(1))
    out = m(s_t, jnp.array([0.1, 0.9]), f, i_t)
    rel = float(jnp.abs(out - out32).max() / jnp.abs(out32).max())
    assert rel <= tol, rel
    # The time input matters.
    assert not np.allclose(m32(s_t, 0.1, f, i_t), m32(s_t, 0.9, f, i_t))


def test_zero_initialised_bridge_outputs_exact_zeros():
    s_t, _, _, z_t = _inputs()
    bridge = Bridge(BRIDGE, rngs=nnx.Rngs(0))
    i_t, c_t = bridge(z_t, s_t, jnp.array([981, 1]))
    assert i_t.shape == (2, 8, 6, 3) and c_t.shape == (2, 8, 6, 4)
    assert not jnp.any(i_t) and not jnp.any(c_t)


def test_bridge_streams_exchange_information():
    s_t, _, _, z_t = _inputs()
    bridge = Bridge(BRIDGE, rngs=nnx.Rngs(0))
    # Give the zero heads weights, as training would.
    for head in (bridge.i_out, bridge.c_out):
        head.kernel[...] = jax.random.normal(jax.random.key(3), head.kernel.shape) * 0.1
    i_a, c_a = bridge(z_t, s_t, 500)
    i_z, c_z = bridge(z_t + 1.0, s_t, 500)  # change the image only
    i_s, c_s = bridge(z_t, s_t + 1.0, 500)  # change the segmentation only
    # Each output depends on both modalities through the exchange convs.
    for a, b in ((i_a, i_z), (i_a, i_s), (c_a, c_z), (c_a, c_s)):
        assert float(jnp.abs(a - b).max()) > 1e-4


def test_segdm_learns_labels_from_features():
    """A few Adam steps of cross-entropy on a fixed example: the loss must drop by 3x."""
    r = np.random.default_rng(0)
    labels = jnp.asarray(r.integers(0, SEG.num_classes, (2, 8, 6)))
    f_lq = jax.nn.one_hot(labels, 6) * 2.0  # features that reveal the labels
    model = SegDM(SEG, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    noise = jnp.asarray(r.standard_normal((2, 8, 6, 8)), jnp.float32)
    i_t = jnp.zeros((2, 8, 6, 3))

    def loss_fn(m):
        s_t = 0.3 * m.embed_labels(labels) + 0.95 * noise
        logits = m(s_t, jnp.array([0.5, 0.5]), f_lq, i_t)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @nnx.jit
    def step(m, o):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    first = float(step(model, opt))
    for _ in range(40):
        last = float(step(model, opt))
    assert last < first / 3, (first, last)
