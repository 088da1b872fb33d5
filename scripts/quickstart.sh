#!/usr/bin/env bash
# First result: install (once, into ./.venv) and train Difficulty-Net on the embedded
# long-tailed digits data set (scikit-learn's load_digits); ~2-4 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_venv.sh requirements.txt
exec python -m experiments.train --config=experiments/configs/digits_lt.py \
  --workdir="${WORKDIR:-runs/digits_lt}" "$@"
