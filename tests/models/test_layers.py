"""Parity of the shared blocks with diffusers' modules, through the generic state-dict mapper."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segsr_jax.models import attention, layers
from segsr_jax.weights.checkpoint_files import CheckpointError
from segsr_jax.weights.torch_mapping import load_state_dict, state_dict_from_module
from tests.torch_reference import assert_close_rel, nchw_to_nhwc, nhwc_to_nchw, perturb_, torch

dl = pytest.importorskip("diffusers.models.resnet")
da = pytest.importorskip("diffusers.models.attention_processor")
demb = pytest.importorskip("diffusers.models.embeddings")


def _sd(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("cin,cout,groups", [(8, 8, 4), (8, 16, 2), (12, 6, 3)])
def test_resnet_block_matches_diffusers(cin, cout, groups, np_rng):
    ref = perturb_(
        dl.ResnetBlock2D(
            in_channels=cin, out_channels=cout, temb_channels=10, groups=groups, eps=1e-6
        ),
        seed=cin + cout,
    )
    ours = load_state_dict(
        lambda: layers.ResnetBlock2D(
            cin, cout, temb_channels=10, groups=groups, eps=1e-6, rngs=nnx.Rngs(0)
        ),
        _sd(ref),
    )
    x = np_rng.standard_normal((2, 6, 5, cin)).astype(np.float32)
    t = np_rng.standard_normal((2, 10)).astype(np.float32)
    with torch.no_grad():
        want = nchw_to_nhwc(ref(nhwc_to_nchw(x), torch.from_numpy(t)))
    assert_close_rel(ours(jnp.asarray(x), jnp.asarray(t)), want)


@pytest.mark.parametrize("cross", [None, 7])
def test_attention_matches_diffusers(cross, np_rng):
    ref = perturb_(da.Attention(16, cross_attention_dim=cross, heads=4, dim_head=8), seed=3)
    ours = load_state_dict(
        lambda: attention.Attention(
            16, heads=4, dim_head=8, cross_attention_dim=cross, rngs=nnx.Rngs(0)
        ),
        _sd(ref),
    )
    x = np_rng.standard_normal((2, 9, 16)).astype(np.float32)
    ctx = None if cross is None else np_rng.standard_normal((2, 5, cross)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), None if ctx is None else torch.from_numpy(ctx)).numpy()
    got = ours(jnp.asarray(x), None if ctx is None else jnp.asarray(ctx))
    assert_close_rel(got, want)


@pytest.mark.parametrize("flip,shift,dim", [(True, 0.0, 32), (False, 1.0, 16), (True, 1.0, 15)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    t = torch.tensor([0, 1, 17, 999])
    want = demb.get_timestep_embedding(
        t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    ).numpy()
    got = layers.timestep_embedding(
        jnp.asarray(t.numpy()), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    )
    # sin/cos of arguments up to 999 in float32: one ulp there is 6e-5.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_up_and_down_sample_match_diffusers(np_rng):
    down = perturb_(dl.Downsample2D(6, use_conv=True, out_channels=6, padding=1, name="op"), seed=1)
    up = perturb_(dl.Upsample2D(6, use_conv=True, out_channels=6), seed=2)
    ours_down = load_state_dict(lambda: layers.Downsample2D(6, rngs=nnx.Rngs(0)), _sd(down))
    ours_up = load_state_dict(lambda: layers.Upsample2D(6, rngs=nnx.Rngs(0)), _sd(up))
    x = np_rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    with torch.no_grad():
        assert_close_rel(ours_down(jnp.asarray(x)), nchw_to_nhwc(down(nhwc_to_nchw(x))))
        assert_close_rel(ours_up(jnp.asarray(x)), nchw_to_nhwc(up(nhwc_to_nchw(x))))
        want = nchw_to_nhwc(up(nhwc_to_nchw(x), output_size=(13, 11)))
    assert_close_rel(ours_up(jnp.asarray(x), output_size=(13, 11)), want)


def test_mapper_round_trip_and_errors():
    make = lambda: layers.ResnetBlock2D(4, 8, temb_channels=3, groups=2, eps=1e-5, rngs=nnx.Rngs(1))
    sd = state_dict_from_module(make())
    again = state_dict_from_module(load_state_dict(make, sd))
    assert sd.keys() == again.keys()
    for k in sd:
        np.testing.assert_array_equal(sd[k], again[k])

    bad = dict(sd)
    bad["conv1.weight"] = bad["conv1.weight"][:, :2]
    with pytest.raises(CheckpointError, match="conv1.weight"):
        load_state_dict(make, bad)
    missing = {k: v for k, v in sd.items() if k != "norm2.bias"}
    with pytest.raises(CheckpointError, match="norm2.bias"):
        load_state_dict(make, missing)
    extra = dict(sd, **{"conv3.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="conv3.weight"):
        load_state_dict(make, extra)


@pytest.mark.parametrize("lq", [64, 4096])  # one block; query chunks on CPU
def test_attention_gradients_recompute_scores_instead_of_storing_them(lq, np_rng):
    """The backward pass of ``attention.attention`` equals plain softmax attention's and keeps
    no [Lq, Lk] probabilities: at 4096 tokens its temporaries are a fraction of the stored
    score matrix (the flash-attention memory pattern)."""
    import jax

    heads, d, lk = 2, 8, lq
    q, k, v = (
        jnp.asarray(np_rng.standard_normal((1, n, heads * d)), jnp.float32) for n in (lq, lk, lk)
    )

    def plain(q, k, v):
        qh, kh, vh = (x.reshape(1, -1, heads, d) for x in (q, k, v))
        return jax.nn.dot_product_attention(qh, kh, vh).reshape(1, lq, heads * d)

    def loss(fn):
        return jax.jit(
            jax.grad(
                lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, *(() if fn is plain else (heads,))))),
                argnums=(0, 1, 2),
            )
        )

    ours, ref = loss(attention.attention), loss(plain)
    for a, b in zip(ours(q, k, v), ref(q, k, v), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    scores_bytes = heads * lq * lk * 4
    temp = ours.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    if lq == 4096:
        assert temp < scores_bytes / 4, (temp, scores_bytes)
