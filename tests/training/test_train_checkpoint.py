"""TrainCheckpointer: real Orbax round trips, the keep policy, damaged checkpoints, and the
EMA overlay that makes a training checkpoint sampleable."""

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from segsr_jax import checkpoint
from segsr_jax.models.segdm import SegDM, SegDMConfig
from segsr_jax.training import state as state_lib


def _trees(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"a": {"kernel": jax.random.normal(k1, (4, 3))}, "b": {0: {"w": jnp.arange(5.0)}}}
    opt = optax.adamw(1e-3).init(params)
    opt = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, opt)
    return {"params": params,
            "ema_params": jax.tree.map(lambda x: x * 0.5, params),
            "opt_state": opt,
            "train": {"step": jnp.int32(seed), "rng": jax.random.key_data(k2)}}


def _abstract(trees):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trees)


def _data():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save(ckpt, step, trees, it):
    ckpt.save(step, params=trees["params"], ema_params=trees["ema_params"],
              opt_state=trees["opt_state"], train=trees["train"], data_iterator=it,
              config={"model": {}, "note": step})


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_data_position(tmp_path):
    ckpt = checkpoint.TrainCheckpointer(tmp_path, checkpoint.CheckpointOptions(every=1))
    it = _data()
    for step in (1, 2):
        next(it), next(it)
        _save(ckpt, step, _trees(step), it)
    assert not ckpt.save(2, **{"params": {}, "ema_params": {}, "opt_state": {}, "train": {},
                               "data_iterator": it, "config": {}})  # exists: skipped
    ckpt.close()
    fresh = _data()
    step, items = checkpoint.TrainCheckpointer(tmp_path, checkpoint.CheckpointOptions()).restore(
        _abstract(_trees(0)), fresh)
    assert step == 2
    _assert_equal(items, _trees(2))
    assert jax.tree.structure(items["opt_state"]) == jax.tree.structure(_trees(2)["opt_state"])
    assert next(fresh) == 4   # the iterator continues after the 4 elements consumed
    assert checkpoint.read_checkpoint_config(tmp_path)["note"] == 2


def test_keep_last_and_keep_every(tmp_path):
    ckpt = checkpoint.TrainCheckpointer(
        tmp_path, checkpoint.CheckpointOptions(every=1, keep_last=2, keep_every=4,
                                               async_save=False))
    it = _data()
    for step in range(1, 10):
        _save(ckpt, step, _trees(step), it)
    ckpt.close()
    assert ckpt.all_steps() == [4, 8, 9]


@pytest.mark.parametrize("damage", ["lost_metadata", "garbled_data_state"])
def test_damaged_latest_is_reported_and_previous_used(tmp_path, damage):
    ckpt = checkpoint.TrainCheckpointer(tmp_path, checkpoint.CheckpointOptions())
    it = _data()
    for step in (3, 6):
        next(it)
        _save(ckpt, step, _trees(step), it)
    ckpt.close()
    if damage == "lost_metadata":
        (tmp_path / "6" / "params" / "_METADATA").unlink()
    else:
        for f in (tmp_path / "6" / "data").glob("process_*.json"):
            f.write_text("{not json")
    # An unfinished save (Orbax's temporary folder) is never taken for a checkpoint.
    (tmp_path / "9.orbax-checkpoint-tmp").mkdir()
    reports = []
    fresh = _data()
    step, items = checkpoint.TrainCheckpointer(tmp_path, checkpoint.CheckpointOptions()).restore(
        _abstract(_trees(0)), fresh, report=reports.append)
    assert step == 3
    _assert_equal(items, _trees(3))
    assert next(fresh) == 1
    assert len(reports) == 2 and f"{tmp_path}/6 is unreadable" in reports[0]
    assert "removed unreadable checkpoint" in reports[1]
    assert checkpoint.TrainCheckpointer(tmp_path, checkpoint.CheckpointOptions()).all_steps() \
        == [3]


def test_shape_mismatch_is_an_error_not_damage(tmp_path):
    ckpt = checkpoint.TrainCheckpointer(tmp_path, checkpoint.CheckpointOptions())
    _save(ckpt, 1, _trees(1), _data())
    ckpt.close()
    target = _abstract(_trees(0))
    target["params"]["a"]["kernel"] = jax.ShapeDtypeStruct((4, 5), jnp.float32)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"a/kernel: saved \(4, 3\)"):
        checkpoint.TrainCheckpointer(tmp_path, checkpoint.CheckpointOptions()).restore(
            target, _data())


def test_empty_folder_restores_nothing(tmp_path):
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "ck", checkpoint.CheckpointOptions())
    assert ckpt.restore(_abstract(_trees(0)), _data()) is None


CFG = SegDMConfig(num_classes=3, embed_dim=4, feat_channels=2, cond_channels=2,
                  hidden_channels=8, num_blocks=1, attention_blocks=(), num_heads=2,
                  norm_groups=4)


def test_restore_model_puts_trainable_ema_over_params(tmp_path):
    """A training checkpoint stores all params plus the EMA of the trainable sub-tree;
    sampling gets the EMA where there is one and the params elsewhere."""
    model = SegDM(CFG, rngs=nnx.Rngs(3))
    full = nnx.to_pure_dict(nnx.state(model))
    trainable = {"conv_out": full["conv_out"], "blocks": {0: full["blocks"][0]}}
    ema = jax.tree.map(lambda x: x + 1.0, trainable)
    ckpt = checkpoint.TrainCheckpointer(tmp_path, checkpoint.CheckpointOptions())
    ckpt.save(5, params=full, ema_params=ema, opt_state={"count": jnp.int32(0)},
              train={"step": jnp.int32(5)},
              data_iterator=_data(), config={"segdm": dataclasses.asdict(CFG)})
    ckpt.close()
    build = lambda cfg: SegDM(SegDMConfig(**{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in cfg["segdm"].items()}),
                              rngs=nnx.Rngs(0))
    restored, _ = checkpoint.restore_model(tmp_path, build)
    got = nnx.to_pure_dict(nnx.state(restored))
    _assert_equal(got["conv_out"], ema["conv_out"])
    _assert_equal(got["blocks"][0], ema["blocks"][0])
    _assert_equal(got["conv_in"], full["conv_in"])          # not trained: the params
    plain, _ = checkpoint.restore_model(tmp_path, build, prefer_ema=False)
    _assert_equal(nnx.to_pure_dict(nnx.state(plain)), full)
    merged = state_lib.merge_trees(trainable, state_lib.take_like(full, {"conv_in": 0}))
    assert set(merged) == {"conv_out", "blocks", "conv_in"}
