"""``train.remat``: rematerialised blocks give the gradients of the plain step (float32
rounding) and really are rematerialised. (What it saves is measured at SD-2 size by
benchmarks/memory_plan.py: the tiny model's peak is elsewhere.)"""

import jax
import numpy as np
import pytest
from flax import nnx

from segsr_jax.models import remat
from segsr_jax.training import losses
from segsr_jax.training import state as state_lib
from tests.training.test_step import _batch
from tests.training.tiny_train_config import random_params


def _loss_and_grad(policy: str):
    graphdef, full = random_params()
    model = nnx.merge(graphdef, full)
    remat.set_remat(model, policy)
    graphdef, params, frozen = state_lib.split_model(model, "joint", ("unet",))
    cfg = losses.LossConfig(stage="joint")

    def loss_fn(p, batch, key):
        return losses.compute_loss(nnx.merge(graphdef, p, frozen), batch, key, cfg)[0]

    fn = jax.jit(jax.value_and_grad(loss_fn))
    args = (params, _batch(), jax.random.key(0))
    return fn, args


@pytest.fixture(scope="module")
def plain():
    fn, args = _loss_and_grad("none")
    return fn(*args), _checkpoints(fn, args)


def _checkpoints(fn, args) -> int:
    """Rematerialised regions in the step's jaxpr (attention always has some of its own)."""
    return str(jax.make_jaxpr(fn)(*args)).count("remat")


@pytest.mark.parametrize("policy", ["blocks", "full"])
def test_remat_gradients_equal_the_plain_step(plain, policy):
    (loss0, grads0), plain_checkpoints = plain
    fn, args = _loss_and_grad(policy)
    # Really rematerialised: more checkpointed regions than the plain step's attention ones.
    assert _checkpoints(fn, args) > plain_checkpoints
    loss, grads = fn(*args)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    flat0 = jax.tree_util.tree_leaves_with_path(grads0)
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(flat0) > 50
    # float32 rounding: relative to each leaf, and to the largest gradient for leaves whose
    # exact gradient is zero (e.g. attention key biases: softmax ignores them).
    largest = max(float(np.abs(np.asarray(g)).max()) for _, g in flat0)
    for (path, g0), g in zip(flat0, flat, strict=True):
        g0, g = np.asarray(g0), np.asarray(g)
        tol = 1e-5 * float(np.abs(g0).max()) + 1e-7 * largest
        assert float(np.abs(g - g0).max()) <= tol, jax.tree_util.keystr(path)


def test_set_remat_marks_blocks_or_stages_and_rejects_unknown_policies():
    graphdef, full = random_params()
    model = nnx.merge(graphdef, full)

    def marked():
        return {
            "/".join(map(str, p)) for p, n in nnx.iter_graph(model) if getattr(n, "remat", False)
        }

    remat.set_remat(model, "blocks")
    blocks = marked()
    assert "unet/down_blocks/0/resnets/0" in blocks and "segdm/blocks/0" in blocks
    assert "unet/down_blocks/0" not in blocks and not any(p.startswith("vae") for p in blocks)
    remat.set_remat(model, "full")
    full_marks = marked()
    assert "unet/down_blocks/0" in full_marks and "controlnet/mid_block" in full_marks
    assert "unet/down_blocks/0/resnets/0" not in full_marks  # inside a stage
    assert "segdm/blocks/0" in full_marks  # SegDM has no stages
    remat.set_remat(model, "none")
    assert not marked()
    with pytest.raises(ValueError, match="remat 'some'"):
        remat.set_remat(model, "some")
