#!/usr/bin/env bash
# Make .venv with the server extra (CPU torch) and the test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  .venv/bin/pip install --quiet torch==2.13.0
fi
echo "setup: installing heron with the server and test extras"
.venv/bin/pip install --quiet -e '.[server,test]'
