"""The code base is ``ruff check`` clean and ``ruff format`` formatted (pyproject.toml)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff() -> str:
    ruff = shutil.which("ruff")
    if ruff is None:  # the test extra installs it into the venv (scripts/test.sh: on PATH)
        pytest.fail("ruff not found: install the test extra (pip install -e '.[test]')")
    return ruff


@pytest.mark.parametrize(
    "args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"]
)
def test_ruff_clean(args):
    out = subprocess.run([_ruff(), *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"ruff {' '.join(args)}:\n{out.stdout}{out.stderr}"
