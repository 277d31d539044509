"""scripts/test.sh (what `.ci/run` and the README run): the tests see the venv's tools.

A fresh machine has no shellcheck on PATH; the test extra installs one into .venv/bin, so the
script must put that folder on PATH for pytest. Run here against stand-ins for python3 and the
venv's python that record what they were given (no install, no network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.launch.conftest import REPO, shellcheck, write_executable
from tests.launch.test_gpu_scripts import with_interpreter_bin_on_path

FAKE_VENV_PYTHON = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:3] == ["-m", "pytest"]:
    with open(os.environ["RECORD"], "w") as f:
        json.dump({{"argv": sys.argv[1:], "path": os.environ["PATH"],
                   "virtual_env": os.environ.get("VIRTUAL_ENV")}}, f)
"""
FAKE_PYTHON3 = f"""#!{sys.executable}
import os, shutil, sys
assert sys.argv[1:] == ["-m", "venv", ".venv"], sys.argv
os.makedirs(".venv/bin", exist_ok=True)
shutil.copy(os.environ["FAKE_VENV_PYTHON"], ".venv/bin/python")
"""


def test_pytest_runs_with_the_venv_bin_first_on_path(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "test.sh", repo / "scripts" / "test.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "python3", FAKE_PYTHON3)
    venv_python = write_executable(tmp_path / "venv_python", FAKE_VENV_PYTHON)
    record = tmp_path / "record.json"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "SEGSR_TEST_WORKERS")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        RECORD=str(record),
        FAKE_VENV_PYTHON=str(venv_python),
    )
    subprocess.run(
        ["bash", "scripts/test.sh", "tests/x.py", "-k", "y"],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    seen = json.loads(record.read_text())
    # Exactly one -q: CI reads pytest's one-line "N passed" summary.
    assert seen["argv"] == [
        "-m",
        "pytest",
        "-q",
        "-n",
        "2",
        "--dist",
        "loadfile",
        "tests/x.py",
        "-k",
        "y",
    ]
    path = seen["path"].split(os.pathsep)
    assert path[0] == str(repo / ".venv" / "bin")
    assert path[1:] == env["PATH"].split(os.pathsep)
    assert seen["virtual_env"] == str(repo / ".venv")


def test_shellcheck_clean(monkeypatch):
    with_interpreter_bin_on_path(monkeypatch)
    shellcheck("scripts/test.sh", ".ci/run")
