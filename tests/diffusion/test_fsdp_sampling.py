"""Sampling with FSDP-sharded parameters (the layout training and ``--fsdp`` hold them in):
the production ``make_sample_fn`` takes them where they lie, equals replicated sampling, and
compiles once for batches of one shape."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from segsr_jax import parallel
from segsr_jax.diffusion import plans, samplers, sampling
from tests.diffusion.test_sampling import _inputs, perturb
from tests.tiny_segsr import tiny_model

# The tiny model's UNet / ControlNet kernels are small: shard every one whose output axis
# divides (the SD-2 rules' min_size would leave them all replicated).
RULES = parallel.ShardingRules(
    param_axes=parallel.FSDP_RULES.param_axes,
    logical_rules=parallel.FSDP_RULES.logical_rules,
    min_size=0,
)


@pytest.fixture(scope="module")
def coupled():
    return perturb(tiny_model(0), seed=1)


def _fsdp_state(state, mesh):
    shardings = parallel.tree_shardings(state, mesh, RULES)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)


@pytest.mark.parametrize("fsdp", [4])  # float32 here; the training test: fsdp 2, bf16
def test_fsdp_sharded_params_sample_like_replicated_and_compile_once(coupled, fsdp):
    mesh = parallel.make_mesh(-1, fsdp)
    g, st = nnx.split(coupled)
    sharded = _fsdp_state(st, mesh)
    specs = [x.sharding.spec for x in jax.tree.leaves(sharded)]
    assert sum(s != PartitionSpec() for s in specs) >= 20  # really sharded over 'fsdp'
    assert all("fsdp" in str(s) for s in specs if s != PartitionSpec())
    plan = plans.make_plan((16, 16), 2, tile=96)
    sched = samplers.make_schedule("ddim", 2)
    b = mesh.shape["data"]
    fn = sampling.make_sample_fn(g, plan, mesh, state_shardings=sampling.shardings_of(sharded))
    reference = sampling.make_sample_fn(g, plan)
    outs = []
    for seed in (0, 1):  # two batches of one shape: one compiled program
        lq, ctx, uctx = _inputs(coupled, b=b, hw=(16, 16), seed=seed)
        key = jax.random.key(seed)
        got = fn(sharded, lq, ctx, uctx, 2.0, sched, key)
        # The parameters were not gathered onto the inputs' layout first: still sharded.
        assert got.image.sharding.spec == PartitionSpec("data")
        want = reference(jax.device_put(st, jax.devices()[0]), lq, ctx, uctx, 2.0, sched, key)
        scale = float(np.abs(np.asarray(want.image)).max())
        err = float(np.abs(np.asarray(got.image) - np.asarray(want.image)).max())
        assert err <= 1e-5 * scale, (fsdp, seed, err, scale)
        np.testing.assert_allclose(np.asarray(got.latent), np.asarray(want.latent), atol=1e-5)
        outs.append(np.asarray(got.image))
    assert fn._cache_size() == 1
    assert not np.allclose(outs[0], outs[1])
