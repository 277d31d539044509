"""TrainCheckpointer in a real two-process JAX run (CPU, gloo collectives): the processes
restore the same step even when only one of them could see the damage, and fail together.

Each phase starts two worker processes (tests/training/checkpoint_worker.py) on one folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.launch.conftest import REPO

WORKER = Path(__file__).with_name("checkpoint_worker.py")


def run_two(mode: str, folder: Path, **env) -> list[dict]:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    environ.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), mode, str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
            cwd=REPO,
        )
        for i in (0, 1)
    ]
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=240)
            assert proc.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:  # a hang (one process stuck in a collective) leaves none behind
            proc.kill()
            proc.wait()
    return outs


def test_processes_agree_on_the_step_and_fail_together(tmp_path):
    folder = tmp_path / "ck"
    assert [o["saved"] for o in run_two("save", folder)] == [[3, 6], [3, 6]]
    assert sorted(p.name for p in (folder / "6" / "data").glob("*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    # Only process 1's data state is garbled: on its own, process 0 would take step 6.
    (folder / "6" / "data" / "process_1-of-2.json").write_text("{not json")
    p0, p1 = run_two("restore", folder)
    assert "error" not in p0 and "error" not in p1, (p0, p1)
    assert p0["step"] == p1["step"] == 3 and p0["w"] == p1["w"] == 3.0
    assert p0["next"] == p1["next"] == 1  # each process's own iterator state
    assert p0["steps"] == p1["steps"] == [3]
    assert len(p0["reports"]) == 2 and "process_1-of-2.json is not JSON" in p0["reports"][0]
    assert p1["reports"] == []  # process 1 inspected nothing
    [aside] = folder.glob("6.broken-*")
    assert (aside / "data" / "process_1-of-2.json").read_text() == "{not json"

    # Process 1's first read of step 3 fails: it alone retries, and both go on together.
    p0, p1 = run_two("restore", folder, FAIL_RESTORE_ONCE="1")
    assert p0["step"] == p1["step"] == 3 and p0["w"] == p1["w"] == 3.0, (p0, p1)
    assert p0["reports"] == [] and len(p1["reports"]) == 1
    assert "UNAVAILABLE: injected read error" in p1["reports"][0]

    # Process 1 cannot read its part of step 3: both stop, process 1 saying why.
    p0, p1 = run_two("restore", folder, FAIL_RESTORE="1")
    assert p1["error"].startswith(f"CheckpointReadError: could not read checkpoint {folder}/3")
    assert p0["error"] == (
        f"CheckpointReadError: another process could not read checkpoint "
        f"{folder}/3: see its messages"
    )
    assert (folder / "3").is_dir() and aside.is_dir()
