#!/usr/bin/env bash
# Creates ./.venv (once) and installs the pinned requirements into it, idempotently.
# Usage: source scripts/ensure_venv.sh [requirements-file]
set -euo pipefail
_req="${1:-requirements.txt}"
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_py="${PYTHON:-python3}"
if [ ! -x "$_root/.venv/bin/python" ]; then
  "$_py" -m venv "$_root/.venv"
fi
_stamp="$_root/.venv/.installed-$(basename "$_req")-$(cat "$_root/$_req" "$_root/requirements.txt" "$_root/setup.cfg" | cksum | cut -d' ' -f1)"
if [ ! -f "$_stamp" ]; then
  "$_root/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$_root/$_req"
  "$_root/.venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$_root"
  touch "$_stamp"
fi
export PATH="$_root/.venv/bin:$PATH"
