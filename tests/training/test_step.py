"""The jitted training step: stage masks, gradient accumulation, shardings and donation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segsr_jax import parallel
from segsr_jax.training import losses
from segsr_jax.training import state as state_lib
from segsr_jax.training import step as step_lib
from tests.training.tiny_train_config import random_params

B, S = 8, 32


@pytest.fixture(scope="module")
def model_parts():
    graphdef, full = random_params()
    graphdef, params, frozen = state_lib.split_model(nnx.merge(graphdef, full), "seg")
    mesh = parallel.make_mesh(data=4, fsdp=2)
    rules = parallel.ShardingRules(
        param_axes=((r"(unet|segdm)/.*kernel$", ("in", "out")),),
        logical_rules=(("in", None), ("out", "fsdp")),
        min_size=1,
    )
    return graphdef, params, frozen, mesh, rules


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "hr": rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8),
        "lq": rng.integers(0, 256, (B, S // 4, S // 4, 3), dtype=np.uint8),
        "label": rng.integers(0, 4, (B, S, S), dtype=np.uint8),
        "input_ids": rng.integers(0, 300, (B, 16)).astype(np.int32),
    }


def _cfg(accum=1, lr=1e-3, eps=1e-8):
    return step_lib.StepConfig(
        loss=losses.LossConfig(stage="seg"),
        optimizer=state_lib.OptimizerConfig(learning_rate=lr, warmup_steps=0, eps=eps),
        accum_steps=accum,
    )


def test_micro_batches_stay_spread_over_devices():
    x = {"a": jnp.arange(8)}
    got = step_lib._micro_batches(x, 2, None)["a"]
    np.testing.assert_array_equal(got, [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_seg_step_on_the_mesh(model_parts):
    """One sharded, donated step with 2 accumulated micro-batches: only SegDM changes, the
    frozen modules have no optimizer state, and the update equals the one from the mean of
    the micro-batches' gradients computed one by one."""
    graphdef, params, frozen, mesh, rules = model_parts
    # eps = 1 makes Adam's first update ~ lr * g: linear in the gradient, so float noise in
    # exactly-zero gradients (e.g. attention key biases) cannot flip its sign.
    cfg = _cfg(accum=2, lr=1e-2, eps=1.0)
    opt = state_lib.make_optimizer(cfg.optimizer)
    state = state_lib.init_train_state(params, opt, seed=1)
    bs = parallel.batch_sharding(mesh, ("data", "fsdp"))
    shardings = step_lib.StepShardings(
        state=parallel.tree_shardings(jax.eval_shape(lambda: state), mesh, rules),
        frozen=parallel.tree_shardings(frozen, mesh, rules),
        batch={k: bs for k in _batch()},
        replicated=parallel.replicated(mesh),
    )
    assert shardings.state.params["segdm"]["conv_in"]["kernel"].spec == jax.sharding.PartitionSpec(
        None, None, None, "fsdp"
    )
    dev_state = parallel.place(state, shardings.state)
    dev_frozen = parallel.place(frozen, shardings.frozen)
    batch = _batch(1)
    fn = step_lib.make_train_step(graphdef, cfg, shardings)
    compiled, report = step_lib.compile_step(fn, dev_state, dev_frozen, jax.device_put(batch, bs))
    assert report.seconds > 0 and report.argument_bytes > 0 and report.alias_bytes > 0
    new, metrics = compiled(dev_state, dev_frozen, jax.device_put(batch, bs))
    assert dev_state.params["segdm"]["conv_in"]["kernel"].is_deleted()  # donated
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss_seg"])
    assert "loss_sr" not in metrics  # SRDM not scored in stage seg
    assert int(new.step) == 1
    kernel = new.params["segdm"]["conv_in"]["kernel"]
    assert kernel.sharding == shardings.state.params["segdm"]["conv_in"]["kernel"]

    # Stage mask: SRDM, bridge, VAE, text and SegFormer bit-identical; only SegDM moved.
    before = state_lib.merge_trees(params, frozen)
    after = jax.device_get(state_lib.merge_trees(new.params, dev_frozen))
    flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    flat_a = dict(jax.tree_util.tree_flatten_with_path(after)[0])
    changed = {
        parallel.path_str(p).split("/")[0]
        for p in flat_b
        if not np.array_equal(flat_b[p], flat_a[p])
    }
    assert changed == {"segdm"}
    moments = [
        parallel.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(new.opt_state)[0]
    ]
    assert {m.split("/")[3] for m in moments if "/mu/" in m or "/nu/" in m} == {"segdm"}

    # The same update by hand, unsharded: per-micro-batch grads with their keys, averaged.
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    micro = step_lib._micro_batches(batch, 2, None)

    @jax.jit
    def grad(p, mb, k):
        loss = lambda p: losses.compute_loss(nnx.merge(graphdef, p, frozen), mb, k, cfg.loss)[0]
        return jax.value_and_grad(loss)(p)

    outs = [
        grad(params, jax.tree.map(lambda x, i=i: x[i], micro), jax.random.fold_in(key, i))
        for i in range(2)
    ]
    g = jax.tree.map(lambda a, b: (a + b) / 2, outs[0][1], outs[1][1])
    updates, _ = opt.update(g, state.opt_state, params)
    want = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(metrics["loss"], (outs[0][0] + outs[1][0]) / 2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_state_finiteness_check():
    st = state_lib.TrainState(
        step=jnp.int32(3),
        rng=jnp.zeros(2, jnp.uint32),
        params={"w": jnp.ones(2)},
        ema_params={"w": jnp.ones(2)},
        opt_state=({"m": jnp.array([0.0, jnp.inf])},),
    )
    with pytest.raises(step_lib.NonFiniteError, match="NaN/Inf at step 3; not saving"):
        step_lib.check_state_finite(st, 3)
    step_lib.check_state_finite(
        st.__class__(st.step, st.rng, st.params, st.ema_params, ({"m": jnp.zeros(2)},)), 3
    )
    with pytest.raises(step_lib.NonFiniteError, match="step 7 .*last checkpoint is step 5"):
        step_lib.check_metrics_finite({"loss": np.float32(np.nan), "finite": 0.0}, 7, 5)
