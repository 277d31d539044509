"""TrainCheckpointer: real Orbax round trips, the keep policy, damaged checkpoints, and the
EMA overlay that makes a training checkpoint sampleable."""

import dataclasses
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from segsr_jax import checkpoint
from segsr_jax.models.segdm import SegDM, SegDMConfig
from segsr_jax.training import checkpointer
from segsr_jax.training import state as state_lib


def _trees(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"a": {"kernel": jax.random.normal(k1, (4, 3))}, "b": {0: {"w": jnp.arange(5.0)}}}
    opt = optax.adamw(1e-3).init(params)
    opt = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, opt)
    return {
        "params": params,
        "ema_params": jax.tree.map(lambda x: x * 0.5, params),
        "opt_state": opt,
        "train": {"step": jnp.int32(seed), "rng": jax.random.key_data(k2)},
    }


def _abstract(trees):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trees)


def _data():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save(ckpt, step, trees, it):
    ckpt.save(
        step,
        params=trees["params"],
        ema_params=trees["ema_params"],
        opt_state=trees["opt_state"],
        train=trees["train"],
        data_iterator=it,
        config={"model": {}, "note": step},
    )


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_data_position(tmp_path):
    ckpt = checkpointer.TrainCheckpointer(tmp_path, checkpointer.CheckpointOptions(every=1))
    it = _data()
    for step in (1, 2):
        next(it), next(it)
        _save(ckpt, step, _trees(step), it)
    assert not ckpt.save(
        2,
        **{
            "params": {},
            "ema_params": {},
            "opt_state": {},
            "train": {},
            "data_iterator": it,
            "config": {},
        },
    )  # exists: skipped
    ckpt.close()
    fresh = _data()
    step, items = checkpointer.TrainCheckpointer(
        tmp_path, checkpointer.CheckpointOptions()
    ).restore(_abstract(_trees(0)), fresh)
    assert step == 2
    _assert_equal(items, _trees(2))
    assert jax.tree.structure(items["opt_state"]) == jax.tree.structure(_trees(2)["opt_state"])
    assert next(fresh) == 4  # the iterator continues after the 4 elements consumed
    assert checkpoint.read_checkpoint_config(tmp_path)["note"] == 2


def test_keep_last_and_keep_every(tmp_path):
    ckpt = checkpointer.TrainCheckpointer(
        tmp_path,
        checkpointer.CheckpointOptions(every=1, keep_last=2, keep_every=4, async_save=False),
    )
    it = _data()
    for step in range(1, 10):
        _save(ckpt, step, _trees(step), it)
    ckpt.close()
    assert ckpt.all_steps() == [4, 8, 9]


def _checkpointer(path, **kwargs):
    return checkpointer.TrainCheckpointer(
        path, checkpointer.CheckpointOptions(), retry_delay_s=0, **kwargs
    )


def _two_steps(tmp_path):
    """Steps 3 and 6, the data iterator one element further at each."""
    ckpt = _checkpointer(tmp_path)
    it = _data()
    for step in (3, 6):
        next(it)
        _save(ckpt, step, _trees(step), it)
    ckpt.close()


def _files(path):
    """Every file under ``path`` with its size: what a restore must leave as it was."""
    return {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}


DAMAGE = {
    "lost_metadata": lambda d: (d / "params" / "_METADATA").unlink(),
    "lost_array_index": lambda d: (d / "opt_state" / "manifest.ocdbt").unlink(),
    "lost_item": lambda d: shutil.rmtree(d / "train"),
    "garbled_config": lambda d: (d / "config" / "metadata").write_text('{"format": '),
    "garbled_data_state": lambda d: [
        f.write_text("{not json") for f in (d / "data").glob("process_*.json")
    ],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_broken_latest_is_skipped_kept_aside_and_saved_again(tmp_path, damage):
    _two_steps(tmp_path)
    DAMAGE[damage](tmp_path / "6")
    broken_files = _files(tmp_path / "6")
    # An unfinished save (Orbax's temporary folder) is never taken for a checkpoint.
    (tmp_path / "9.orbax-checkpoint-tmp").mkdir()
    reports = []
    fresh = _data()
    ckpt = _checkpointer(tmp_path)
    step, items = ckpt.restore(_abstract(_trees(0)), fresh, report=reports.append)
    assert step == 3
    _assert_equal(items, _trees(3))
    assert next(fresh) == 1
    assert len(reports) == 2, reports
    assert f"{tmp_path}/6 is broken" in reports[0]
    # Not deleted: moved aside, every file as it was, under a name Orbax does not list.
    [aside] = tmp_path.glob("6.broken-*")
    assert f"moved broken checkpoint {tmp_path}/6 aside to {aside}" in reports[1]
    assert _files(aside) == broken_files and broken_files
    assert not (tmp_path / "6").exists()
    assert ckpt.all_steps() == [3]
    # The run goes on past step 6 and saves it again; that is what the next resume takes.
    _save(ckpt, 6, _trees(60), fresh)
    ckpt.close()
    step, items = _checkpointer(tmp_path).restore(_abstract(_trees(0)), _data())
    assert step == 6
    _assert_equal(items, _trees(60))
    assert _files(aside) == broken_files


def test_transient_read_error_is_retried_and_nothing_changes(tmp_path, monkeypatch):
    _two_steps(tmp_path)
    before = _files(tmp_path)
    failed = []
    read = checkpointer._read_bytes

    def flaky(path):
        if str(path).endswith("6/params/_METADATA") and not failed:
            failed.append(path)
            raise ConnectionResetError("connection reset by peer")
        return read(path)

    monkeypatch.setattr(checkpointer, "_read_bytes", flaky)
    reports = []
    step, items = _checkpointer(tmp_path).restore(
        _abstract(_trees(0)), _data(), report=reports.append
    )
    assert failed and step == 6
    _assert_equal(items, _trees(6))
    assert len(reports) == 1 and f"read checkpoint {tmp_path}/6 failed" in reports[0]
    assert "ConnectionResetError" in reports[0] and "attempt 2 of 4" in reports[0]
    assert _files(tmp_path) == before


def test_transient_error_of_the_array_reads_is_retried(tmp_path):
    _two_steps(tmp_path)
    before = _files(tmp_path)
    ckpt = _checkpointer(tmp_path)
    restore, calls = ckpt._mgr.restore, []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:  # tensorstore reports I/O errors as ValueError
            raise ValueError("DEADLINE_EXCEEDED: reading gs://bucket/6/params/d/abc")
        return restore(*args, **kwargs)

    ckpt._mgr.restore = flaky
    fresh = _data()
    step, items = ckpt.restore(_abstract(_trees(0)), fresh, report=lambda _: None)
    assert step == 6 and calls == [6, 6]
    _assert_equal(items, _trees(6))
    assert next(fresh) == 2
    assert _files(tmp_path) == before


def test_persistent_read_error_raises_and_changes_nothing(tmp_path, monkeypatch):
    _two_steps(tmp_path)
    before = _files(tmp_path)
    read, attempts = checkpointer._read_bytes, []

    def failing(path):
        if "/6/" in str(path):
            attempts.append(path)
            raise PermissionError(f"403 Forbidden: {path}")
        return read(path)

    monkeypatch.setattr(checkpointer, "_read_bytes", failing)
    reports = []
    ckpt = _checkpointer(tmp_path, read_attempts=3)
    with pytest.raises(
        checkpointer.CheckpointReadError,
        match=rf"could not read checkpoint {tmp_path}/6 \(3 attempts; nothing "
        r"was changed\): PermissionError: 403 Forbidden",
    ):
        ckpt.restore(_abstract(_trees(0)), _data(), report=reports.append)
    assert len(attempts) == 3 and len(reports) == 2
    assert _files(tmp_path) == before
    assert ckpt.all_steps() == [3, 6]


def test_persistent_error_of_the_array_reads_raises(tmp_path):
    """A lost array chunk: the step's files all say the save finished, so nothing proves the
    step broken; the reads fail on every try and the restore stops, changing nothing."""
    _two_steps(tmp_path)
    chunks = sorted((tmp_path / "6" / "params").glob("**/d/*"))
    assert chunks
    for chunk in chunks:
        chunk.unlink()
    before = _files(tmp_path)
    reports = []
    with pytest.raises(
        checkpointer.CheckpointReadError,
        match=rf"could not read checkpoint {tmp_path}/6 \(2 attempts",
    ):
        _checkpointer(tmp_path, read_attempts=2).restore(
            _abstract(_trees(0)), _data(), report=reports.append
        )
    assert len(reports) == 1 and "retrying" in reports[0]
    assert _files(tmp_path) == before


def test_failed_move_aside_raises(tmp_path, monkeypatch):
    _two_steps(tmp_path)
    (tmp_path / "6" / "config" / "metadata").unlink()
    ckpt = _checkpointer(tmp_path, read_attempts=2)

    def refuse(self, target):
        raise PermissionError(f"403: may not write {target}")

    monkeypatch.setattr(type(ckpt._path), "rename", refuse)
    with pytest.raises(
        checkpointer.CheckpointReadError,
        match=rf"could not rename {tmp_path}/6 to {tmp_path}/6.broken-\S+ "
        r"\(2 attempts\): PermissionError",
    ):
        ckpt.restore(_abstract(_trees(0)), _data(), report=lambda _: None)
    assert (tmp_path / "6" / "params" / "_METADATA").exists()


def test_every_step_broken_raises_and_changes_nothing(tmp_path):
    _two_steps(tmp_path)
    for step in (3, 6):
        (tmp_path / str(step) / "ema_params" / "_METADATA").unlink()
    before = _files(tmp_path)
    with pytest.raises(
        checkpoint.CheckpointMismatchError,
        match=rf"every checkpoint in {tmp_path} is broken .*"
        rf"{tmp_path}/6: ema_params/_METADATA is missing",
    ):
        _checkpointer(tmp_path).restore(_abstract(_trees(0)), _data(), report=lambda _: None)
    assert _files(tmp_path) == before


def test_data_state_of_another_process_count_is_a_mismatch(tmp_path):
    _two_steps(tmp_path)
    data = tmp_path / "6" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
    before = _files(tmp_path)
    with pytest.raises(
        checkpoint.CheckpointMismatchError,
        match="another number of processes .*process_0-of-2.json",
    ):
        _checkpointer(tmp_path).restore(_abstract(_trees(0)), _data(), report=lambda _: None)
    assert _files(tmp_path) == before


def test_other_processes_restore_the_step_process_0_chose(tmp_path, monkeypatch):
    """Process 1 of 2 (simulated): it inspects nothing and restores what process 0 chose,
    here step 3 although step 6 is intact; it raises when process 0 could not choose, and
    when some process failed its part of the restore."""
    _two_steps(tmp_path)
    monkeypatch.setattr(checkpointer, "_process_index", lambda: 1)
    monkeypatch.setattr(checkpointer, "_process_count", lambda: 2)
    sent, agreed = [], []

    def from_process_0(choice):
        def broadcast(values):
            sent.append(values.tolist())
            return np.array(choice)

        return broadcast

    def never(path):
        raise AssertionError(f"process 1 read {path}")

    monkeypatch.setattr(checkpointer, "_read_bytes", never)
    monkeypatch.setattr(checkpointer, "_broadcast_from_0", from_process_0([3, 0]))
    monkeypatch.setattr(checkpointer, "_all_processes_ok", lambda ok: agreed.append(ok) or ok)
    step, items = _checkpointer(tmp_path).restore(_abstract(_trees(0)), _data())
    assert step == 3 and agreed == [True]
    _assert_equal(items, _trees(3))

    monkeypatch.setattr(checkpointer, "_broadcast_from_0", from_process_0([-2, 0]))
    with pytest.raises(checkpointer.CheckpointReadError, match="process 0 could not choose"):
        _checkpointer(tmp_path).restore(_abstract(_trees(0)), _data())

    monkeypatch.setattr(checkpointer, "_broadcast_from_0", from_process_0([6, 0]))
    monkeypatch.setattr(checkpointer, "_all_processes_ok", lambda ok: False)
    with pytest.raises(
        checkpointer.CheckpointReadError,
        match=f"another process could not read checkpoint {tmp_path}/6",
    ):
        _checkpointer(tmp_path).restore(_abstract(_trees(0)), _data())
    assert len(sent) == 3 and all(v[0] == -2 for v in sent)  # process 1 sends no choice


def test_process_0_broadcasts_its_choice(tmp_path, monkeypatch):
    _two_steps(tmp_path)
    (tmp_path / "6" / "train" / "_METADATA").write_text("[]")
    sent = []
    monkeypatch.setattr(
        checkpointer, "_broadcast_from_0", lambda values: sent.append(values.tolist()) or values
    )
    step, _ = _checkpointer(tmp_path).restore(_abstract(_trees(0)), _data(), report=lambda _: None)
    assert step == 3 and sent == [[3, 1]]  # step 3; one broken step moved aside


def test_shape_mismatch_is_an_error_not_damage(tmp_path):
    ckpt = checkpointer.TrainCheckpointer(tmp_path, checkpointer.CheckpointOptions())
    _save(ckpt, 1, _trees(1), _data())
    ckpt.close()
    target = _abstract(_trees(0))
    target["params"]["a"]["kernel"] = jax.ShapeDtypeStruct((4, 5), jnp.float32)
    before = _files(tmp_path)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"a/kernel: saved \(4, 3\)"):
        checkpointer.TrainCheckpointer(tmp_path, checkpointer.CheckpointOptions()).restore(
            target, _data()
        )
    assert _files(tmp_path) == before


def test_empty_folder_restores_nothing(tmp_path):
    ckpt = checkpointer.TrainCheckpointer(tmp_path / "ck", checkpointer.CheckpointOptions())
    assert ckpt.restore(_abstract(_trees(0)), _data()) is None


CFG = SegDMConfig(
    num_classes=3,
    embed_dim=4,
    feat_channels=2,
    cond_channels=2,
    hidden_channels=8,
    num_blocks=1,
    attention_blocks=(),
    num_heads=2,
    norm_groups=4,
)


def test_restore_model_puts_trainable_ema_over_params(tmp_path):
    """A training checkpoint stores all params plus the EMA of the trainable sub-tree;
    sampling gets the EMA where there is one and the params elsewhere."""
    model = SegDM(CFG, rngs=nnx.Rngs(3))
    full = nnx.to_pure_dict(nnx.state(model))
    trainable = {"conv_out": full["conv_out"], "blocks": {0: full["blocks"][0]}}
    ema = jax.tree.map(lambda x: x + 1.0, trainable)
    ckpt = checkpointer.TrainCheckpointer(tmp_path, checkpointer.CheckpointOptions())
    ckpt.save(
        5,
        params=full,
        ema_params=ema,
        opt_state={"count": jnp.int32(0)},
        train={"step": jnp.int32(5)},
        data_iterator=_data(),
        config={"segdm": dataclasses.asdict(CFG)},
    )
    ckpt.close()
    build = lambda cfg: SegDM(
        SegDMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["segdm"].items()}),
        rngs=nnx.Rngs(0),
    )
    restored, _ = checkpoint.restore_model(tmp_path, build)
    got = nnx.to_pure_dict(nnx.state(restored))
    _assert_equal(got["conv_out"], ema["conv_out"])
    _assert_equal(got["blocks"][0], ema["blocks"][0])
    _assert_equal(got["conv_in"], full["conv_in"])  # not trained: the params
    plain, _ = checkpoint.restore_model(tmp_path, build, prefer_ema=False)
    _assert_equal(nnx.to_pure_dict(nnx.state(plain)), full)
    merged = state_lib.merge_trees(trainable, state_lib.take_like(full, {"conv_in": 0}))
    assert set(merged) == {"conv_out", "blocks", "conv_in"}
