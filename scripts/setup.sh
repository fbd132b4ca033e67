#!/usr/bin/env bash
# Makes .venv with what the package and its tests need (CPU torch unless one is already importable
# by python3 with CUDA), and installs this package in it, editable. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    python3 -m venv --system-site-packages .venv   # a GPU machine: reuse its CUDA torch
  else
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch==2.13.0
  fi
fi
.venv/bin/pip install -q -e '.[test]'
