#!/usr/bin/env bash
# One command: set up .venv, then run a whole federation on this machine (embedded broker,
# one server process, 3 device processes, sklearn digits; no download). Extra arguments go
# to `heron run`, e.g. scripts/demo.sh --rounds 5 --devices 4.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/heron run "$@"
