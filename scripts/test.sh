#!/usr/bin/env bash
# The whole test suite: install (once, into ./.venv) the test requirements, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_venv.sh requirements-test.txt
exec python -m pytest tests "$@"
