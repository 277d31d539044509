"""Stage masks, the optimizer schedule, the EMA and abstract model building."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segsr_jax import parallel
from segsr_jax.models.segdm import SegDM
from segsr_jax.training import state as state_lib
from tests.test_checkpoint import CFG as SEGDM_CFG
from tests.training.tiny_train_config import model_config


@pytest.fixture(scope="module")
def abstract():
    return state_lib.abstract_model(model_config(), jnp.float32)


@pytest.mark.parametrize(
    "stage,also,want",
    [
        ("vae", (), {"vae"}),
        ("decoder", (), {"vae"}),
        ("sr", (), {"controlnet"}),
        ("seg", (), {"segdm"}),
        ("joint", (), {"controlnet", "segdm", "bridge"}),
        ("sr", ("unet",), {"controlnet", "unet"}),
    ],
)
def test_stage_selects_trainable_modules(abstract, stage, also, want):
    _, params, frozen = state_lib.split_model(abstract, stage, also)
    assert set(params) == want
    everything = state_lib.merge_trees(params, frozen)
    assert set(everything) == set(state_lib.MODULES)
    assert state_lib.count_params(params) + state_lib.count_params(
        frozen
    ) == state_lib.count_params(nnx.state(abstract))
    assert state_lib.take_like(everything, params).keys() == params.keys()


def test_stage_decoder_trains_the_decoder_side_of_the_vae_only(abstract):
    _, params, frozen = state_lib.split_model(abstract, "decoder")
    assert set(params["vae"]) == {"decoder", "post_quant_conv"}
    assert {"encoder", "quant_conv"} <= set(frozen["vae"])
    assert "decoder" not in frozen["vae"]


def test_batch_statistics_are_never_trained(abstract):
    _, params, frozen = state_lib.split_model(abstract, "seg", ("segformer",))
    # The BatchNorm's affine params train with the module; its running statistics never do.
    assert set(params["segformer"]["decode_head"]["batch_norm"]) == {"bias", "scale"}
    assert set(frozen["segformer"]["decode_head"]["batch_norm"]) == {"mean", "var"}


def test_unknown_stage_or_module_is_refused():
    with pytest.raises(ValueError, match="stage 'srr'"):
        state_lib.trainable_filter("srr")
    with pytest.raises(ValueError, match=r"unknown module\(s\) \['unets'\]"):
        state_lib.trainable_filter("sr", ("unets",))


def test_shape_only_rngs_build_the_same_model():
    real = nnx.eval_shape(lambda: SegDM(SEGDM_CFG, rngs=nnx.Rngs(0)))
    fast = nnx.eval_shape(lambda: SegDM(SEGDM_CFG, rngs=state_lib.ShapeOnlyRngs()))
    (g1, s1), (g2, s2) = nnx.split(real), nnx.split(fast)
    assert g1 == g2
    assert jax.tree.map(lambda a: (a.shape, a.dtype), s1) == jax.tree.map(
        lambda a: (a.shape, a.dtype), s2
    )


def test_learning_rate_schedules():
    const = state_lib.make_schedule(state_lib.OptimizerConfig(learning_rate=1.0, warmup_steps=10))
    np.testing.assert_allclose([const(0), const(5), const(10), const(1000)], [0, 0.5, 1, 1])
    cos = state_lib.make_schedule(
        state_lib.OptimizerConfig(
            learning_rate=1.0, warmup_steps=10, schedule="cosine", decay_steps=110, end_factor=0.1
        )
    )
    np.testing.assert_allclose(
        [cos(10), cos(60), cos(110), cos(500)], [1, 0.55, 0.1, 0.1], atol=1e-6
    )
    with pytest.raises(ValueError, match="decay_steps > warmup_steps"):
        state_lib.OptimizerConfig(schedule="cosine", warmup_steps=10, decay_steps=5)


def test_ema_update_warms_up():
    ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    # step 0: decay min(0.999, 1/10) = 0.1 -> 0.9 of the new params
    np.testing.assert_allclose(state_lib.ema_update(ema, params, 0.999, jnp.int32(0))["w"], 0.9)
    # late: the configured decay
    np.testing.assert_allclose(state_lib.ema_update(ema, params, 0.5, jnp.int32(10**6))["w"], 0.5)


def test_init_train_state_has_moments_for_trainable_params_only(abstract):
    _, params, _ = state_lib.split_model(abstract, "seg")
    opt = state_lib.make_optimizer(state_lib.OptimizerConfig())
    st = jax.eval_shape(lambda p: state_lib.init_train_state(p, opt, 0), params)
    paths = [parallel.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(st.opt_state)[0]]
    # clip_by_global_norm, then adamw's (ScaleByAdamState(count, mu, nu), ...)
    roots = {p.split("/")[3] for p in paths if p.split("/")[2] in ("mu", "nu")}
    assert roots == {"segdm"}
    # two moments per trainable scalar, plus the step counters of adam and the schedule
    assert state_lib.count_params(st.opt_state) == 2 * state_lib.count_params(params) + 2
    assert st.step.dtype == jnp.int32 and st.rng.dtype == jnp.uint32


def test_lr_multipliers_scale_only_their_modules():
    import optax

    from segsr_jax.training.state import OptimizerConfig, make_optimizer

    params = {"bridge": {"w": jnp.ones((3,))}, "unet": {"w": jnp.ones((3,))}}
    grads = {
        "bridge": {"w": jnp.array([0.1, -0.2, 0.3])},
        "unet": {"w": jnp.array([0.3, 0.2, -0.1])},
    }
    base = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    fast = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, lr_multipliers={"bridge": 10.0})
    assert fast.lr_multipliers == (("bridge", 10.0),)
    ups = []
    for cfg in (base, fast):
        opt = make_optimizer(cfg)
        state = opt.init(params)
        # The second update, with Adam's moments past their first step.
        ups.append(opt.update(grads, opt.update(grads, state, params)[1], params)[0])
    np.testing.assert_allclose(ups[1]["bridge"]["w"], 10 * ups[0]["bridge"]["w"], rtol=1e-6)
    np.testing.assert_array_equal(ups[1]["unet"]["w"], ups[0]["unet"]["w"])
    assert float(optax.tree.norm(ups[0]["bridge"])) > 0
    with pytest.raises(ValueError, match="lr_multipliers"):
        OptimizerConfig(lr_multipliers={"bridges": 2.0})
    # Without multipliers the optimizer state keeps its structure (old checkpoints resume).
    n_plain = len(jax.tree.leaves(make_optimizer(base).init(params)))
    assert n_plain == len(jax.tree.leaves(make_optimizer(fast).init(params)))


def test_frozen_storage_halves_matrices_only():
    tree = {
        "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)},
        "norm": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)},
        "count": jax.ShapeDtypeStruct((2, 2), jnp.int32),
    }
    low = state_lib.frozen_storage(tree, "bfloat16")
    assert low["conv"]["kernel"].dtype == jnp.bfloat16
    assert low["norm"]["scale"].dtype == jnp.float32 and low["count"].dtype == jnp.int32
    same = state_lib.frozen_storage(tree, "float32")
    assert jax.tree.map(lambda a: a.dtype, same) == jax.tree.map(lambda a: a.dtype, tree)
    with pytest.raises(ValueError, match="frozen_dtype"):
        state_lib.frozen_storage(tree, "float16")
    values = {
        "conv": {"kernel": jnp.full((3, 3, 4, 8), 1 / 3)},
        "norm": {"scale": jnp.ones(8)},
        "count": jnp.ones((2, 2), jnp.int32),
    }
    cast = state_lib.cast_like(values, low, jax.tree.map(lambda x: x.sharding, values))
    assert cast["conv"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(cast["conv"]["kernel"], np.float32), 1 / 3, rtol=4e-3)
