"""The files of a pack besides its wheels: templates `devices.pack` fills in.

@NAME@ placeholders are replaced by `devices.pack`; everything else is written as is.
"""

DEVICE_TOML = """\
# heron device configuration: `heron device --config /etc/heron/device.toml`.
# Keys are `heron device`'s long options; a flag given on the command line wins.
broker = "@BROKER@"
id = "board-0"
data = "/var/lib/heron/shard.npz"
profile = "@PROFILE@"
prefix = "heron"
# threads = 4                                  # default: the profile's
# username = "device"
# password = "secret"
# credentials = "/etc/heron/credentials.json"  # {"username": ..., "password": ...}
# ca_file = "/etc/heron/ca.crt"                # TLS: use broker = "mqtts://HOST:8883"
"""

SERVICE = """\
[Unit]
Description=heron split federated learning device (heron device)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=heron
Group=heron
WorkingDirectory=/var/lib/heron
Environment=PYTHONUNBUFFERED=1
ExecStart=/opt/heron/venv/bin/heron device --config /etc/heron/device.toml
Restart=on-failure
RestartSec=15
# exit status 5: the model does not fit this board's memory budget; a restart cannot help
RestartPreventExitStatus=5
# `systemctl stop` sends SIGTERM: the device says it is offline and exits 143 (128 + 15)
SuccessExitStatus=143
# if memory runs out anyway, the kernel picks this process before sshd
OOMScoreAdjust=500

[Install]
WantedBy=multi-user.target
"""

README = """\
heron device pack for @TARGET@, CPython @PY@ (no network needed on the board)

On the board, as root, from this directory:

  sh install.sh --broker mqtt://SERVER:1883 --id kitchen-pi --profile rpi4
  cp dev-0.npz /var/lib/heron/shard.npz       # this device's shard
  systemctl enable --now heron-device
  journalctl -u heron-device -f                 # memory check, rounds, peak RSS

`sh install.sh --help` lists the options; /etc/heron/device.toml holds the settings.
"""

INSTALL_SH = r"""#!/bin/sh
# Install heron's device runtime from this pack with no network (pip --no-index).
#
#   sh install.sh [--prefix /opt/heron] [--config-dir /etc/heron] [--data-dir /var/lib/heron]
#                 [--broker URL] [--id DEVICE_ID] [--profile NAME] [--python python3]
#                 [--no-service]
#
# Makes PREFIX/venv, installs heron from wheels/, writes CONFIG_DIR/device.toml (kept if it
# exists), and as root with systemd: adds the `heron` user and the heron-device.service unit.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/heron
CONFIG_DIR=/etc/heron
DATA_DIR=/var/lib/heron
PYTHON=python3
SERVICE=1
BROKER=
ID=
PROFILE=
die() { echo "install.sh: $*" >&2; exit 1; }  # several arguments print as one line
need() { [ $# -ge 2 ] || die "$1 needs a value; help: sh install.sh --help"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) need "$@"; PREFIX=$2; shift 2 ;;
    --config-dir) need "$@"; CONFIG_DIR=$2; shift 2 ;;
    --data-dir) need "$@"; DATA_DIR=$2; shift 2 ;;
    --broker) need "$@"; BROKER=$2; shift 2 ;;
    --id) need "$@"; ID=$2; shift 2 ;;
    --profile) need "$@"; PROFILE=$2; shift 2 ;;
    --python) need "$@"; PYTHON=$2; shift 2 ;;
    --no-service) SERVICE=0; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown option $1; help: sh install.sh --help" ;;
  esac
done
for v in "$PREFIX" "$CONFIG_DIR" "$DATA_DIR" "$BROKER" "$ID" "$PROFILE"; do
  case "$v" in *'"'*|*'\'*|*'|'*|*'&'*) die "option value $v may not contain \" \\ | or &" ;; esac
done

# The pack holds binary wheels for one machine type and Python version: check first.
command -v "$PYTHON" >/dev/null 2>&1 ||
  die "no $PYTHON here; help: install Python @PY@ and its venv module" \
      "(Debian: apt-get install python3 python3-venv)"
WHAT='import platform, sys; print(platform.machine(), "%d.%d" % sys.version_info[:2])'
got=$("$PYTHON" -c "$WHAT")
[ "$got" = "@ARCH@ @PY@" ] ||
  die "this pack is for @ARCH@ with Python @PY@ but this board has $got; help: on the" \
      "server, heron devices pack --target linux-MACHINE --python X.Y"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
  die "$PYTHON cannot make virtual environments; help: apt-get install python3-venv"

echo "install.sh: creating $PREFIX/venv"
"$PYTHON" -m venv "$PREFIX/venv"
export PIP_CONFIG_FILE=/dev/null  # the board's pip.conf (e.g. an extra index) plays no part
PIP="$PREFIX/venv/bin/python -m pip --disable-pip-version-check"
$PIP install --quiet --no-index --find-links "$HERE/wheels" --upgrade pip
$PIP install --quiet --no-index --find-links "$HERE/wheels" "@PROJECT@==@VERSION@"
VERSIONS='import edge_runtime.device, onnxruntime as o, numpy as n
print(o.__version__, n.__version__)'
got=$("$PREFIX/venv/bin/python" -c "$VERSIONS") ||
  die "the installed runtime does not import; see the error above"
echo "install.sh: installed heron @VERSION@ (onnxruntime, numpy: $got) in $PREFIX/venv"

mkdir -p "$CONFIG_DIR" "$DATA_DIR"
CONFIG="$CONFIG_DIR/device.toml"
if [ -f "$CONFIG" ]; then
  echo "install.sh: keeping the existing $CONFIG"
else
  [ -n "$ID" ] || ID=$(hostname 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '-' | cut -c1-64)
  [ -n "$ID" ] || ID=board-0
  sed -e "s|^data = .*|data = \"$DATA_DIR/shard.npz\"|" -e "s|^id = .*|id = \"$ID\"|" \
      "$HERE/device.toml" > "$CONFIG.tmp"
  [ -z "$BROKER" ] || sed -i "s|^broker = .*|broker = \"$BROKER\"|" "$CONFIG.tmp"
  [ -z "$PROFILE" ] || sed -i "s|^profile = .*|profile = \"$PROFILE\"|" "$CONFIG.tmp"
  chmod 600 "$CONFIG.tmp"
  mv "$CONFIG.tmp" "$CONFIG"
  echo "install.sh: wrote $CONFIG (device id $ID)"
fi

if [ "$SERVICE" = 1 ] && [ "$(id -u)" = 0 ] && command -v systemctl >/dev/null 2>&1; then
  id heron >/dev/null 2>&1 ||
    useradd --system --home-dir "$DATA_DIR" --shell /usr/sbin/nologin heron
  chown heron:heron "$DATA_DIR"
  chgrp heron "$CONFIG" && chmod 640 "$CONFIG"
  sed -e "s|/opt/heron/|$PREFIX/|g" -e "s|/etc/heron/|$CONFIG_DIR/|g" \
      -e "s|/var/lib/heron|$DATA_DIR|g" "$HERE/heron-device.service" \
      > /etc/systemd/system/heron-device.service
  systemctl daemon-reload
  echo "install.sh: installed heron-device.service; start it at boot with:"
  echo "  systemctl enable --now heron-device && journalctl -u heron-device -f"
else
  echo "install.sh: no service installed; run the device with:"
  echo "  $PREFIX/venv/bin/heron device --config $CONFIG"
fi
echo "install.sh: put this device's shard at $DATA_DIR/shard.npz (or set data in $CONFIG)"
"""
