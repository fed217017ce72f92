#!/usr/bin/env bash
# Creates .venv and installs kernelize with its test extras, once (again when pyproject.toml changes).
# torch is pinned first to the local CPU wheel; later ranges (torch>=2.6) are then satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.kernelize-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up .venv (first run only)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
