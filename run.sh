#!/usr/bin/env bash
# Main job: optimize the embedded default model (all-MiniLM-L6-v2, shipped offline) into ./kernelize-out.
# Extra arguments go to `kernelize optimize` (e.g. ./run.sh model.onnx -o out/).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
export HF_HUB_OFFLINE=1
if [ $# -eq 0 ]; then
  exec .venv/bin/kernelize optimize --force
fi
exec .venv/bin/kernelize optimize "$@"
