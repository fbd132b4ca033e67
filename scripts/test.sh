#!/usr/bin/env bash
# The README's test command: sets up .venv, then runs pytest (CPU; Triton kernels through the
# interpreter; CUDA-only tests are skipped without a GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" "$@"
