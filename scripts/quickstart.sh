#!/usr/bin/env bash
# Installs the runtime dependencies into .venv (CPU) and trains the quickstart model on the built-in dataset.
# Output: workdirs/quickstart/ (checkpoints, TensorBoard logs, metrics.jsonl, samples_<step>.png).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
exec .venv/bin/python -m dig_jax.train --config configs/quickstart.py --workdir workdirs/quickstart "$@"
