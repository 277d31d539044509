"""Where a training run reports: stdout, ``WORKDIR/metrics.jsonl``, TensorBoard event files
(``WORKDIR/tensorboard``) and sample grids (``WORKDIR/samples/step_N.png``).

Only process 0 writes (every process computes the same replicated metrics); the others get a
log whose methods do nothing, so the training loop calls them unconditionally.

``WORKDIR`` may be local or ``gs://`` (see :mod:`segsr_jax.training.workdir`). Locally the
files are written in place (``metrics.jsonl`` line by line). Object storage cannot append, so
for a remote workdir every file is written into a local staging folder and uploaded whole:
at :meth:`MetricsLog.flush` (the trainer calls it after each checkpoint) and at
:meth:`MetricsLog.close`; ``metrics.jsonl`` and the sample PNGs also after each image and at
most every ``sync_every_s`` seconds when records are written. TensorBoard's event file grows
for the whole run and holds the images, so it is uploaded only at flush and close (not
re-sent every minute). A remote ``metrics.jsonl`` of an earlier run is downloaded first,
so a resumed run keeps appending to it; a crash loses at most the records since the last
upload.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
import uuid
from collections.abc import Mapping

import numpy as np
from etils import epath

from segsr_jax import images
from segsr_jax.training import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Scalars, text and images of one run; a context manager that closes it.

    Args:
      workdir: the run's folder (local path or ``gs://`` URI).
      enabled: False on every process but 0.
      tensorboard: also write TensorBoard event files (needs ``tensorboardX``).
      sync_every_s: remote workdir only: the longest a written record waits in the staging
        folder before an upload (checked when records are written).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        sync_every_s: float = 60.0,
    ):
        self.enabled = enabled
        self.workdir = epath.Path(workdir)
        self.sync_every_s = sync_every_s
        self._jsonl = None
        self._tb = None
        self._staging = None
        self._last_sync = time.monotonic()
        if not enabled:
            return
        if workdir_lib.is_remote(self.workdir):
            self._staging = workdir_lib.Staging(self.workdir, download=(METRICS_FILE,))
            local = self._staging.local
        else:
            local = pathlib.Path(self.workdir)
            local.mkdir(parents=True, exist_ok=True)
        self._local = local
        self._jsonl = open(local / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            self._tb = _EventFile(local / "tensorboard")

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def text(self, message: str) -> None:
        """A line on stdout (process 0 only)."""
        if self.enabled:
            print(message, flush=True)

    def event(self, kind: str, step: int, **fields) -> None:
        """A JSONL record ``{"event": kind, "step": step, **fields}`` and a stdout line."""
        if not self.enabled:
            return
        self._write({"event": kind, "step": step, "time": time.time(), **fields})
        self.text(f"[{kind}] step {step}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))

    def scalars(
        self, step: int, values: Mapping[str, float], extra: Mapping[str, object] | None = None
    ) -> None:
        """Scalars at ``step`` to stdout, JSONL and TensorBoard; ``extra`` goes to JSONL only
        (e.g. the data indices of the step's examples)."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        self._write(
            {"event": "train", "step": step, "time": time.time(), **values, **dict(extra or {})}
        )
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(values.items()))
        self.text(f"step {step}: {shown}")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.scalar(f"train/{k}", v, step)

    def image(self, step: int, name: str, image: np.ndarray) -> epath.Path | None:
        """Write a uint8 ``[H, W, 3]`` image as ``samples/<name>_step<step>.png`` (and to
        TensorBoard); returns the PNG's path on process 0 (uploaded already if remote)."""
        if not self.enabled:
            return None
        rel = f"samples/{name}_step{step:07d}.png"
        images.write_png(self._local / rel, image)
        if self._tb is not None:
            self._tb.image(name, image, step)
        if self._staging is not None:
            self._sync_light()
        return self.workdir / rel

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk; for a remote workdir, upload what
        changed."""
        if self._tb is not None:
            self._tb.flush()
        if self._staging is not None:
            self._jsonl.flush()
            self._staging.sync()
            self._last_sync = time.monotonic()

    def close(self) -> None:
        """Flush and close the files (a remote workdir gets its last upload). Idempotent."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def _sync_light(self) -> None:
        """Upload what changed except the TensorBoard events (remote workdir)."""
        self._jsonl.flush()
        self._staging.sync(skip=("tensorboard/",))
        self._last_sync = time.monotonic()

    def _write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record, default=_json_default) + "\n")
        if self._staging is not None and time.monotonic() - self._last_sync >= self.sync_every_s:
            self._sync_light()


class _EventFile:
    """A TensorBoard event file written in the caller's thread.

    tensorboardX's ``SummaryWriter`` hands events to a background thread, and its ``flush()``
    does not wait for that thread's queue: an upload right after a flush could miss the last
    events. Here an event is in the file when :meth:`scalar` or :meth:`image` returns, and on
    disk after :meth:`flush`."""

    def __init__(self, folder: pathlib.Path):
        try:
            from tensorboardX import summary
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import event_pb2
        except ImportError as e:
            raise ImportError(
                "TensorBoard logging needs tensorboardX (pip install "
                "tensorboardX), or set --config.log.tensorboard=False"
            ) from e
        folder.mkdir(parents=True, exist_ok=True)
        self._summary, self._event = summary, event_pb2.Event
        # a random suffix: two runs started in the same second get two files, not one
        self._writer = EventsWriter(str(folder / "events"), f".{uuid.uuid4().hex[:8]}")

    def _add(self, value, step: int) -> None:
        self._writer.write_event(self._event(wall_time=time.time(), step=int(step), summary=value))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._add(self._summary.scalar(tag, float(value)), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 ``[H, W, 3]`` image."""
        self._add(self._summary.image(tag, image, dataformats="HWC"), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _json_default(x):
    # numpy scalars and arrays in ``extra`` (data indices) become plain JSON.
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to metrics.jsonl")


def sample_grid(
    lq: np.ndarray, sr: np.ndarray, seg: np.ndarray, hr: np.ndarray | None = None
) -> np.ndarray:
    """One row per example: LQ (nearest-upscaled) | SR | segmentation colours [| HR].

    Args:
      lq: uint8 ``[N, h, w, 3]``; sr: uint8 ``[N, H, W, 3]``; seg: uint8 ``[N, H, W, 3]``
        (colourised); hr: optional uint8 ``[N, H, W, 3]``.

    Returns:
      uint8 ``[N * H, (3 or 4) * W, 3]``.
    """
    rows = []
    for i in range(len(sr)):
        hw = sr.shape[1:3]
        cells = [
            images.resize(lq[i], hw, resample=images.Image.NEAREST),
            sr[i],
            images.resize(seg[i], hw, resample=images.Image.NEAREST),
        ]
        if hr is not None:
            cells.append(hr[i])
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


def stderr(message: str) -> None:
    """A warning line on stderr (every process: warnings are per host)."""
    print(message, file=sys.stderr, flush=True)
