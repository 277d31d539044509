"""Metrics go to stdout, JSONL and real TensorBoard event files; only process 0 writes."""

import json
import struct
import threading

import numpy as np
from tensorboardX.proto import event_pb2

from segsr_jax.training.metrics_log import MetricsLog, sample_grid


def _events(folder):
    """The events of the one TensorBoard event file in ``folder``."""
    (path,) = list(folder.glob("events.out.tfevents.*"))
    return read_event_file(path)


def read_event_file(path):
    """Decode a TensorBoard event file (TFRecord framing + Event protos)."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        out.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n]))
        pos += 12 + n + 4
    return out


def test_scalars_images_and_events(tmp_path, capsys):
    log = MetricsLog(tmp_path, tensorboard=True)
    log.scalars(10, {"loss": np.float32(0.5), "lr": 1e-4}, extra={"data_index": np.array([3, 1])})
    log.event("checkpoint", 10, path="x")
    png = log.image(10, "samples", np.zeros((8, 12, 3), np.uint8))
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "train" and records[0]["loss"] == 0.5
    assert records[0]["data_index"] == [3, 1]
    assert records[1] == {**records[1], "event": "checkpoint", "step": 10, "path": "x"}
    assert "step 10: loss=0.5 lr=0.0001" in capsys.readouterr().out
    assert png.is_file()
    tags = {(v.tag, e.step) for e in _events(tmp_path / "tensorboard") for v in e.summary.value}
    assert {("train/loss", 10), ("train/lr", 10), ("samples", 10)} <= tags


def test_events_are_on_disk_after_flush_without_a_background_thread(tmp_path):
    # tensorboardX's SummaryWriter queues events for a thread and its flush() does not wait
    # for it, so a checkpoint's upload right after a flush could miss the newest events
    threads = threading.active_count()
    log = MetricsLog(tmp_path, tensorboard=True)
    assert threading.active_count() == threads
    for step in range(1, 4):
        log.scalars(step, {"loss": 1.0 / step})
        log.flush()
        tags = {(v.tag, e.step) for e in _events(tmp_path / "tensorboard") for v in e.summary.value}
        assert ("train/loss", step) in tags
    log.close()


def test_two_logs_in_one_second_write_two_event_files(tmp_path):
    for step in (1, 2):
        with MetricsLog(tmp_path, tensorboard=True) as log:
            log.scalars(step, {"loss": 1.0})
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    assert sorted(e.step for f in files for e in read_event_file(f) if e.summary.value) == [1, 2]


def test_other_processes_write_nothing(tmp_path, capsys):
    log = MetricsLog(tmp_path / "w", enabled=False)
    log.scalars(1, {"loss": 1.0})
    log.text("hello")
    assert log.image(1, "samples", np.zeros((2, 2, 3), np.uint8)) is None
    log.close()
    assert not (tmp_path / "w").exists()
    assert capsys.readouterr().out == ""


def test_sample_grid_layout():
    n, h, w = 2, 8, 8
    grid = sample_grid(
        np.zeros((n, 2, 2, 3), np.uint8),
        np.full((n, h, w, 3), 1, np.uint8),
        np.full((n, 4, 4, 3), 2, np.uint8),
        np.full((n, h, w, 3), 3, np.uint8),
    )
    assert grid.shape == (n * h, 4 * w, 3)
    assert (grid[:, w : 2 * w] == 1).all() and (grid[:, 2 * w : 3 * w] == 2).all()
