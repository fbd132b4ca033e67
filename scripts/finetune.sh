#!/usr/bin/env bash
# The README's main job: sets up .venv, then runs the example LoRA fine-tune with its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/finetune.py "$@"
