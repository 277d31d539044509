"""Helpers for tests/test_chaos.py: training and sampling as real processes, killed and
restarted, and what their checkpoints and outputs hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests.conftest import FAST_COMPILE

ROOT = Path(__file__).parents[1]
TRAIN_CONFIG = "tests/training/tiny_train_config.py:seg"
PYTREE_ITEMS = ("params", "ema_params", "opt_state", "train")


def env(devices: int = 8) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}",
    )


def start_train(workdir: Path, cache_dir: Path, *flags: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "segsr_jax.train",
        "--config",
        TRAIN_CONFIG,
        "--workdir",
        str(workdir),
        "--cache_dir",
        str(cache_dir),
        *flags,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def start_sample(cache_dir: Path, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "segsr_jax.sample", "--cache-dir", str(cache_dir), *flags]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL and reap."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


def records(workdir: Path, event: str = "train") -> list[dict]:
    """The complete lines of ``metrics.jsonl`` for ``event`` (a killed run may leave a torn
    last line)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("event") == event:
            out.append(r)
    return out


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.01) -> bool:
    """Poll ``condition()`` until it holds (True), or the process ends (False)."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, "timed out waiting"
        time.sleep(poll)
    return True


def finished_steps(ckpt_dir: Path) -> list[int]:
    """The steps Orbax's CheckpointManager lists as finished."""
    mgr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return sorted(mgr.all_steps())
    finally:
        mgr.close()


def restore_step(ckpt_dir: Path, step: int) -> dict:
    """Every item of one training checkpoint, as numpy: the four pytrees, and the config and
    the data iterator state (parsed JSON)."""
    mgr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        items = mgr.restore(
            step, args=ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in PYTREE_ITEMS})
        )
    finally:
        mgr.close()
    got = {k: jax.tree.map(np.asarray, items[k]) for k in PYTREE_ITEMS}
    folder = ckpt_dir / str(step)
    got["config"] = json.loads((folder / "config" / "metadata").read_text())
    got["data"] = {
        p.name: json.loads(p.read_text()) for p in sorted((folder / "data").glob("process_*.json"))
    }
    assert got["data"], f"{folder}/data holds no iterator state"
    return got


def assert_same_state(a: dict, b: dict) -> None:
    """Params, EMA, optimizer state, step/RNG and data position bitwise equal."""
    for item in PYTREE_ITEMS:
        pa, la = zip(*jax.tree_util.tree_flatten_with_path(a[item])[0], strict=True)
        pb, lb = zip(*jax.tree_util.tree_flatten_with_path(b[item])[0], strict=True)
        assert pa == pb, item
        for path, x, y in zip(pa, la, lb, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape, (item, path)
            assert x.tobytes() == y.tobytes(), f"{item}{jax.tree_util.keystr(path)} differs"
    assert a["data"] == b["data"]
