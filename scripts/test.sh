#!/usr/bin/env bash
# One command: set up .venv (and Mosquitto when root and missing), then run every test.
# Extra arguments go to pytest, e.g. scripts/test.sh -k zo -x.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing mosquitto with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    # the package may start a system broker on 1883; tests use their own ports
  else
    echo "setup: mosquitto is missing; install it (apt-get install mosquitto) for the broker tests" >&2
  fi
fi
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
