#!/usr/bin/env bash
# The test command of the README: makes .venv (CPU torch) if needed, installs the package with its
# test extra, and runs pytest with Triton's interpreter for the kernel tests. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" "$@"
