#!/usr/bin/env bash
# Make, or reuse, an emulated arm64 Debian root for trying device packs without a board:
#
#   scripts/aarch64-root.sh [ROOT]      # default $HERON_AARCH64_ROOT or /var/cache/heron-aarch64-root
#
# Debian bookworm, minbase, python3 + python3-venv, built with debootstrap and run through
# qemu-user-static via binfmt_misc (so `chroot ROOT python3` runs the arm64 Python). Needs
# root and `apt-get install -y debootstrap qemu-user-static binfmt-support`. About 2-4 minutes
# the first time; later calls check the root and reuse it. Prints the root's path last.
# The root is kept pristine: tests install packs into an overlay (or a copy) of it.
set -euo pipefail
ROOT=${1:-${HERON_AARCH64_ROOT:-/var/cache/heron-aarch64-root}}
SUITE=bookworm
MIRROR=${HERON_DEBIAN_MIRROR:-http://deb.debian.org/debian}
STAMP="$ROOT/.heron-aarch64-root"
die() { echo "aarch64-root: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and binfmt_misc); help: sudo $0"
for tool in debootstrap update-binfmts chroot; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool is missing; help: apt-get install -y debootstrap qemu-user-static binfmt-support"
done
[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || command -v qemu-aarch64-static >/dev/null ||
  die "qemu-aarch64-static is missing; help: apt-get install -y qemu-user-static"

# binfmt_misc: the kernel hands arm64 ELF files to qemu
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
    die "cannot mount binfmt_misc on /proc/sys/fs/binfmt_misc"
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null ||
  die "the qemu-aarch64 binfmt handler is not enabled; help: update-binfmts --enable qemu-aarch64"

valid() {
  [ -f "$STAMP" ] && chroot "$ROOT" /usr/bin/python3 -c \
    'import ensurepip, platform, venv; assert platform.machine() == "aarch64"' 2>/dev/null
}
if valid; then
  echo "aarch64-root: reusing $ROOT ($(cat "$STAMP"))" >&2
  echo "$ROOT"
  exit 0
fi

echo "aarch64-root: building $ROOT with debootstrap (Debian $SUITE arm64 minbase)" >&2
rm -rf "$ROOT" "$ROOT.partial"
mkdir -p "$(dirname "$ROOT")"
debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv \
  "$SUITE" "$ROOT.partial" "$MIRROR" >"$ROOT.partial.log" 2>&1 ||
  { tail -20 "$ROOT.partial.log" >&2; die "debootstrap failed (log: $ROOT.partial.log)"; }
rm -rf "$ROOT.partial/var/cache/apt/archives/"*.deb
mv "$ROOT.partial" "$ROOT"
rm -f "$ROOT.partial.log"
echo "Debian $SUITE arm64 minbase + python3 python3-venv, made $(date -u +%Y-%m-%dT%H:%MZ)" \
  >"$STAMP"
valid || die "the new root at $ROOT does not run its python3 under qemu"
echo "$ROOT"
