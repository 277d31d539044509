"""A ``gs://`` workdir, offline: epath's fsspec backend is pointed at a local folder posing
as a bucket (no append, like object storage), and the trainer's logs, TensorBoard events,
sample grids and tokenizer must all land there.

Orbax writes arrays through TensorStore's own GCS driver, which no fsspec stand-in reaches,
so the end-to-end run keeps its checkpoints in a local folder; the checkpoint path over
real gs:// is not covered here.
"""

import importlib
import json

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from segsr_jax import checkpoint, train
from segsr_jax.training import checkpointer
from segsr_jax.training import workdir as workdir_lib
from segsr_jax.training.metrics_log import MetricsLog
from tests.training.test_metrics_log import read_event_file
from tests.training.tiny_train_config import get_config

fsspec_registry = importlib.import_module("fsspec.registry")  # the module, not the mapping


class LocalBucketFS(DirFileSystem):
    """``gs://BUCKET/KEY`` -> ``root/BUCKET/KEY`` on local disk; refuses append modes."""

    protocol = ("gs", "gcs")
    cachable = False
    root = None

    def __init__(self, *args, **storage_options):
        # epath passes gcsfs's finalize_on_close; the bucket lives under ``root``.
        super().__init__(path=str(self.root), fs=LocalFileSystem())

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"object storage cannot open {path} in mode {mode!r}")
        return super().open(path, mode, *args, **kwargs)


def _use_gs_filesystem(monkeypatch, cls):
    """Make epath's ``gs://`` backend fsspec with ``cls`` (or, for None, gcsfs as
    if it were not installed), undone after the test."""
    monkeypatch.setenv("EPATH_USE_TF", "0")  # TensorFlow's gfile would talk to real GCS
    for name in ("gs", "gcs"):
        if cls is None:
            monkeypatch.delitem(fsspec_registry._registry, name, raising=False)
            monkeypatch.setitem(
                fsspec_registry.known_implementations,
                name,
                {
                    "class": "segsr_jax_missing_gcsfs.GCSFileSystem",
                    "err": "Install gcsfs to access Google Storage",
                },
            )
        else:
            monkeypatch.setitem(fsspec_registry._registry, name, cls)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches filesystems


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The local folder behind ``gs://``; ``bucket / "b/run"`` is ``gs://b/run``."""
    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setattr(LocalBucketFS, "root", root)
    _use_gs_filesystem(monkeypatch, LocalBucketFS)
    yield root
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _tags(folder):
    """``{(tag, step)}`` of every event file in ``folder``."""
    return {
        (v.tag, e.step)
        for f in folder.glob("events.out.tfevents.*")
        for e in read_event_file(f)
        for v in e.summary.value
    }


def test_the_fake_bucket_is_object_storage(bucket):
    path = epath.Path("gs://b/run/x.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    assert (bucket / "b/run/x.txt").read_text() == "x"
    with pytest.raises(NotImplementedError, match="mode 'a'"):
        path.open("a")


def test_gs_without_gcsfs_fails_first_and_says_what_to_install(monkeypatch):
    _use_gs_filesystem(monkeypatch, None)
    try:
        with pytest.raises(ImportError, match=r"pip install -e '\.\[gcs\]'"):
            train.train_and_evaluate(get_config(), "gs://b/run")
    finally:
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
    with pytest.raises(ValueError, match="s3:// is not supported"):
        workdir_lib.open_workdir("s3://b/run")


def test_metrics_log_stages_and_uploads(bucket, tmp_path, monkeypatch):
    staging_root = tmp_path / "tmp"
    staging_root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(staging_root))
    remote = bucket / "b/run"
    log = MetricsLog("gs://b/run", sync_every_s=3600)
    log.scalars(1, {"loss": 0.5}, extra={"data_index": np.array([3, 1])})
    assert not (remote / "metrics.jsonl").exists()  # staged, not uploaded yet
    png = log.image(1, "samples", np.zeros((8, 12, 3), np.uint8))
    assert str(png) == "gs://b/run/samples/samples_step0000001.png" and png.exists()
    assert [r["step"] for r in _records(remote)] == [1]  # an image uploads the records ...
    assert not (remote / "tensorboard").exists()  # ... but not the growing event file
    log.event("checkpoint", 2, path="x")
    log.flush()  # (at checkpoints) everything
    assert [r["event"] for r in _records(remote)] == ["train", "checkpoint"]
    assert {("train/loss", 1), ("samples", 1)} <= _tags(remote / "tensorboard")
    log.close()
    log.close()  # idempotent
    assert list(staging_root.iterdir()) == []  # the staging folder is gone
    assert {("train/loss", 1), ("samples", 1)} <= _tags(remote / "tensorboard")

    # A resumed run appends to the uploaded records; sync_every_s=0 uploads every record.
    log = MetricsLog("gs://b/run", tensorboard=False, sync_every_s=0)
    log.scalars(3, {"loss": 0.25})
    assert [r["step"] for r in _records(remote)] == [1, 2, 3]
    log.close()


def test_other_processes_touch_nothing_remote(bucket):
    log = MetricsLog("gs://b/run", enabled=False)
    log.scalars(1, {"loss": 1.0})
    log.close()
    assert list(bucket.iterdir()) == []


def test_tokenizer_written_copied_and_loaded_remotely(bucket):
    c = get_config()
    tok = train.setup_tokenizer(c, epath.Path("gs://b/run/checkpoints"), 16)
    assert (bucket / "b/run/checkpoints/tokenizer/vocab.json").is_file()
    assert tok.source == "gs://b/run/checkpoints/tokenizer"
    assert tok(["grass"]).shape == (1, 16)
    # A tokenizer folder given by path (here remote, ``DIR/tokenizer`` form) is copied.
    c.tokenizer = "gs://b/run/checkpoints"
    copy = train.setup_tokenizer(c, epath.Path("gs://b/run2/checkpoints"), 16)
    src, dest = bucket / "b/run/checkpoints/tokenizer", bucket / "b/run2/checkpoints/tokenizer"
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in src.iterdir())
    assert all((dest / p.name).read_bytes() == p.read_bytes() for p in src.iterdir())
    np.testing.assert_array_equal(copy(["grass, sky"]), tok(["grass, sky"]))


def test_training_into_gs_workdir_and_resuming(bucket, tmp_path, monkeypatch, init_checkpoint):
    """Two real runs (4 steps, then resumed to 6) into ``gs://b/run``; Orbax's part goes to a
    local folder (see the module docstring)."""
    real_checkpointer, asked = checkpointer.TrainCheckpointer, []

    def local_checkpointer(directory, options):
        asked.append(str(directory))
        return real_checkpointer(tmp_path / "orbax", options)

    monkeypatch.setattr(checkpointer, "TrainCheckpointer", local_checkpointer)
    c = get_config("seg")
    c.init_from = str(init_checkpoint)
    c.num_steps = 4
    c.checkpoint.every = 2
    c.sample.every = 4
    assert train.train_and_evaluate(c, "gs://b/run") == 0
    c.num_steps, c.sample.every = 6, 0
    assert train.train_and_evaluate(c, "gs://b/run") == 0

    remote = bucket / "b/run"
    assert asked == ["gs://b/run/checkpoints"] * 2
    records = _records(remote)
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["event"] == "checkpoint"] == [2, 4, 6]
    assert [r["step"] for r in records if r["event"] == "resume"] == [4]
    assert (remote / "samples/samples_step0000004.png").is_file()
    assert (remote / "checkpoints/tokenizer/vocab.json").is_file()
    assert len(list((remote / "tensorboard").glob("events.out.tfevents.*"))) == 2  # 1 a run
    assert {s for t, s in _tags(remote / "tensorboard") if t == "train/loss"} == set(range(1, 7))


def test_load_tokenizer_from_a_gs_checkpoint_folder(bucket):
    """What ``Restorer.from_checkpoint("gs://...")`` uses for the checkpoint's tokenizer."""
    from segsr_jax.training import prompts

    prompts.write_char_tokenizer(epath.Path("gs://b/ck/tokenizer"), 16)
    tok = checkpoint.load_tokenizer("gs://b/ck/tokenizer")
    assert tok.source == "gs://b/ck/tokenizer"
    local = checkpoint.load_tokenizer(bucket / "b/ck/tokenizer")
    np.testing.assert_array_equal(tok(["grass, sky"]), local(["grass, sky"]))
