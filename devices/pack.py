"""`heron devices pack`: an offline install pack for a board, built on the server machine.

A pack is a directory::

    wheels/               heron's own wheel + binary wheels of its runtime dependencies
                          (onnxruntime, numpy, paho-mqtt, psutil and theirs) and pip itself,
                          all for the board's machine type, Python and glibc; never torch
    install.sh            makes a venv and installs from wheels/ with `pip --no-index`
    device.toml           the device's config (`heron device --config`): broker, id, data, ...
    heron-device.service  systemd unit: `heron device --config ...` at boot, restarted on failure
    pack.json             what is inside: target, Python, glibc, every wheel's sha256
    README.txt            the three commands to run on the board

pip downloads wheels for another platform when told its tags (`--platform`,
`--python-version`, `--abi`); with `--only-binary=:all:` it never builds, so a dependency
without a wheel for the target fails here, on the server, and not on the board.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.profiles import load_profile

TARGETS = {"linux-aarch64": "aarch64", "linux-x86_64": "x86_64", "linux-armv7l": "armv7l"}
DEFAULT_BROKER = "mqtt://heron-server.local:1883"
PROJECT = "heron-sfl"
WHEEL_DIR = "wheels"
FORBIDDEN = ("torch",)  # a board never gets these (the device runtime is torch-free)
_NO_WHEEL = re.compile(r"No matching distribution found for ([A-Za-z0-9_.\-]+)")


class PackError(Exception):
    """The pack cannot be built as asked; the message says why and what to do."""


@dataclass(frozen=True)
class PackOptions:
    out: Path
    target: str = "linux-aarch64"
    python: str = "3.11"  # the board's Python, X.Y
    glibc: str = "2.28"  # the board's glibc, X.Y: the newest manylinux wheels accepted
    broker: str | None = None  # written into device.toml
    profile: str = "generic"  # written into device.toml
    source: Path | None = None  # heron checkout to build the wheel from


@dataclass(frozen=True)
class PackResult:
    out: Path
    wheels: tuple[str, ...]
    size_bytes: int
    own_wheel: str


def _version(text: str, what: str, example: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", text)
    if m is None:
        raise PackError(f"{what} {text!r} is not X.Y; help: e.g. {example}")
    return int(m.group(1)), int(m.group(2))


def platform_tags(arch: str, glibc: tuple[int, int]) -> list[str]:
    """Every manylinux tag a board with this glibc accepts (pip does not expand PEP 600 tags
    itself, so an explicit list it is)."""
    if glibc < (2, 17):
        raise PackError(f"glibc {glibc[0]}.{glibc[1]} is older than any manylinux wheel "
                        "(2.17); help: the board's OS is too old for binary wheels")
    return [f"manylinux2014_{arch}",
            *(f"manylinux_2_{minor}_{arch}" for minor in range(17, glibc[1] + 1))]


def find_source(source: Path | None) -> Path:
    """The heron checkout whose wheel goes into the pack."""
    root = Path(source) if source else Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or f'name = "{PROJECT}"' not in pyproject.read_text():
        raise PackError(f"{root} is not a heron source checkout (no pyproject.toml naming "
                        f"{PROJECT}); help: run `heron devices pack` from a checkout "
                        "(`pip install -e .`) or pass --source DIR")
    return root


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise PackError(f"{what} took more than 15 minutes; help: check the connection to "
                        "the package index") from exc


def build_wheel(source: Path, dest: Path) -> Path:
    """`pip wheel --no-deps` of a clean copy of the checkout (no build/ litter in the tree)."""
    with tempfile.TemporaryDirectory(prefix="heron-wheel-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        for item in source.iterdir():
            if item.is_file() and (item.name == "pyproject.toml" or
                                   item.name.startswith(("README", "LICENSE"))):
                shutil.copy2(item, copy / item.name)
            elif item.is_dir() and (item / "__init__.py").is_file():
                shutil.copytree(item, copy / item.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        before = set(dest.glob("*.whl"))
        proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                     "--wheel-dir", str(dest), str(copy)], "building heron's wheel")
        if proc.returncode != 0:
            raise PackError(f"building heron's wheel failed:\n{proc.stderr[-2000:]}\nhelp: "
                            "`pip wheel --no-deps .` in the checkout shows the whole error")
    built = sorted(set(dest.glob("*.whl")) - before)
    if len(built) != 1:
        raise PackError(f"expected one wheel from `pip wheel`, got {[p.name for p in built]}")
    return built[0]


def wheel_metadata(wheel: Path) -> tuple[list[str], str | None, str]:
    """(runtime requirements without extras, Requires-Python, version) from a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = zf.read(name).decode()
    requires, python, version = [], None, ""
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].strip()
            if "extra ==" not in req:
                requires.append(req)
        elif line.startswith("Requires-Python:"):
            python = line.split(":", 1)[1].strip()
        elif line.startswith("Version:"):
            version = line.split(":", 1)[1].strip()
        elif not line.strip():
            break  # the description follows the headers
    return requires, python, version


def check_python(python: tuple[int, int], requires_python: str | None) -> None:
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires_python or "")
    if m and python < (int(m.group(1)), int(m.group(2))):
        raise PackError(f"heron needs Python {requires_python} (Requires-Python of its "
                        f"wheel) and the board's Python {python[0]}.{python[1]} cannot run it; "
                        f"help: install Python {m.group(1)}.{m.group(2)} or newer on the board "
                        "and pass its version with --python")


def download_wheels(requirements: list[str], target: str, python: tuple[int, int],
                    glibc: tuple[int, int], dest: Path) -> None:
    arch = TARGETS[target]
    py = f"{python[0]}{python[1]}"
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", f"{python[0]}.{python[1]}", "--implementation", "cp",
           "--abi", f"cp{py}", "--abi", "abi3", "--abi", "none"]
    for tag in platform_tags(arch, glibc):
        cmd += ["--platform", tag]
    proc = _run([*cmd, *requirements, "pip"], "downloading the dependencies' wheels")
    if proc.returncode == 0:
        return
    missing = _NO_WHEEL.search(proc.stderr)
    where = f"{target} / CPython {python[0]}.{python[1]} / glibc <= {glibc[0]}.{glibc[1]}"
    if missing is None:
        raise PackError(f"pip could not download the wheels for {where}:\n"
                        f"{proc.stderr[-2000:]}\nhelp: check the connection to the package "
                        "index")
    name = missing.group(1)
    hint = ("ONNX Runtime publishes no wheels for 32-bit ARM: put a 64-bit OS on the board "
            "and use --target linux-aarch64" if arch == "armv7l" and
            name.lower().startswith("onnxruntime") else
            "try another --python (the board's) or --glibc, or build that wheel for the "
            "board and put it into the pack's wheels/")
    raise PackError(f"{name} has no wheel for {where} on the package index, so the board "
                    f"could not install it offline; stopping. help: {hint}")


def _safe_out(out: Path) -> None:
    """Refuse to overwrite a directory that is not an earlier pack."""
    if out.exists() and any(out.iterdir()):
        if not (out / "pack.json").is_file():
            raise PackError(f"{out} exists and is not a heron pack; help: pass an empty or "
                            "new --out directory")
        shutil.rmtree(out)


def build_pack(opts: PackOptions) -> PackResult:
    if opts.target not in TARGETS:
        raise PackError(f"unknown target {opts.target!r}; help: one of {', '.join(TARGETS)}")
    python = _version(opts.python, "--python", "3.11")
    glibc = _version(opts.glibc, "--glibc", "2.28 (`ldd --version` on the board)")
    load_profile(opts.profile)  # a typo here would only show on the board
    source = find_source(opts.source)
    final = Path(opts.out)
    _safe_out(final)
    out = final.with_name(final.name + ".partial")  # renamed to `final` once complete
    shutil.rmtree(out, ignore_errors=True)
    try:
        _fill(opts, source, out, python, glibc)
        final.mkdir(parents=True, exist_ok=True)
        final.rmdir()
        out.rename(final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    names = tuple(sorted(p.name for p in (final / WHEEL_DIR).glob("*.whl")))
    own = json.loads((final / "pack.json").read_text())["own_wheel"]
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    return PackResult(final, names, size, own)


def _fill(opts: PackOptions, source: Path, out: Path, python: tuple[int, int],
          glibc: tuple[int, int]) -> None:
    wheels = out / WHEEL_DIR
    wheels.mkdir(parents=True)
    own = build_wheel(source, wheels)
    requirements, requires_python, version = wheel_metadata(own)
    check_python(python, requires_python)
    download_wheels(requirements, opts.target, python, glibc, wheels)
    names = sorted(p.name for p in wheels.glob("*.whl"))
    bad = [n for n in names if n.split("-")[0].lower() in FORBIDDEN]
    if bad:
        raise PackError(f"the pack would contain {bad}; the device runtime must not need "
                        "them: check the dependencies in pyproject.toml")
    arch = TARGETS[opts.target]
    pyver = f"{python[0]}.{python[1]}"
    (out / "device.toml").write_text(device_toml(opts.broker or DEFAULT_BROKER, opts.profile))
    (out / "heron-device.service").write_text(SERVICE)
    install = out / "install.sh"
    install.write_text(INSTALL_SH.replace("@ARCH@", arch).replace("@PY@", pyver)
                       .replace("@VERSION@", version).replace("@PROJECT@", PROJECT))
    install.chmod(0o755)
    (out / "README.txt").write_text(README.replace("@TARGET@", opts.target)
                                    .replace("@PY@", pyver))
    manifest = {
        "project": PROJECT, "version": version, "own_wheel": own.name,
        "target": opts.target, "machine": arch,
        "python": pyver, "glibc": f"{glibc[0]}.{glibc[1]}", "profile": opts.profile,
        "requirements": requirements,
        "wheels": {n: hashlib.sha256((wheels / n).read_bytes()).hexdigest() for n in names},
    }
    (out / "pack.json").write_text(json.dumps(manifest, indent=2) + "\n")


def device_toml(broker: str, profile: str) -> str:
    if '"' in broker or "\\" in broker:
        raise PackError(f"broker URL {broker!r} may not contain quotes or backslashes")
    return DEVICE_TOML.replace("@BROKER@", broker).replace("@PROFILE@", profile)


# -- the files of a pack ----------------------------------------------------------------------
DEVICE_TOML = """\
# heron device configuration: `heron device --config /etc/heron/device.toml`.
# Keys are `heron device`'s long options; a flag given on the command line wins.
# Flat TOML only (key = value), so Python 3.10 boards read it without tomllib.
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
