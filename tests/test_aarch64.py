"""A federation with an emulated arm64 board: the linux-aarch64 pack installed with no network
into a Debian arm64 root (debootstrap) and run there through qemu-user via binfmt_misc, next to
a native device, against Mosquitto and a server on the host's loopback.

Needs root, debootstrap, qemu-user-static and binfmt-support (scripts/test.sh installs them).
The root is built once by scripts/aarch64-root.sh and cached in /var/cache/heron-aarch64-root
(HERON_AARCH64_ROOT); each run installs into a throwaway overlay of it. Emulated timings say
nothing about a real board's speed and are not reported as such.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, heron

pytestmark = [pytest.mark.slow, pytest.mark.broker]

BOARD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME": "/root", "LANG": "C.UTF-8"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")
TOOLS_HINT = "apt-get install -y debootstrap qemu-user-static binfmt-support"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _missing_tooling(why: str) -> None:
    """Missing packages are a setup bug in CI (scripts/test.sh installs them), a skip elsewhere."""
    if _in_ci():
        pytest.fail(f"{why}; scripts/test.sh must install it ({TOOLS_HINT})")
    pytest.skip(f"{why} ({TOOLS_HINT})")


def _emulation_root() -> Path:
    if platform.machine() != "x86_64":
        pytest.skip(f"the emulated-arm64 test is written for x86-64 hosts, this is "
                    f"{platform.machine()}")
    if os.geteuid() != 0:
        _missing_tooling("debootstrap, chroot and binfmt_misc need root")
    missing = [t for t in ("debootstrap", "update-binfmts", "chroot", "unshare")
               if shutil.which(t) is None]
    if not Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P").exists() and \
            shutil.which("qemu-aarch64-static") is None:
        missing.append("qemu-aarch64-static")
    if missing:
        _missing_tooling(f"missing {', '.join(missing)}")
    if "binfmt_misc" not in Path("/proc/filesystems").read_text():
        pytest.skip("this kernel has no binfmt_misc, so it cannot hand arm64 programs to qemu")
    if not (BINFMT / "register").exists():
        mount = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                               capture_output=True, text=True)
        if mount.returncode != 0:  # e.g. an unprivileged container: /proc/sys is read-only
            pytest.skip(f"binfmt_misc cannot be mounted in this sandbox "
                        f"({mount.stderr.strip()}), so arm64 programs cannot run here")
    made = subprocess.run([str(ROOT / "scripts" / "aarch64-root.sh")], capture_output=True,
                          text=True, timeout=1200)
    assert made.returncode == 0, made.stderr[-3000:]
    return Path(made.stdout.strip().splitlines()[-1])


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def _board(root: Path, tmp: Path) -> Iterator[Path]:
    """A writable overlay of the cached root (a copy where overlayfs is missing), with proc
    and sys mounted; all unmounted afterwards, the cached root untouched."""
    board, upper, work = tmp / "board", tmp / "upper", tmp / "work"
    for d in (board, upper, work):
        d.mkdir()
    mounted: list[Path] = []
    try:
        try:
            _mount("-t", "overlay", "overlay", "-o",
                   f"lowerdir={root},upperdir={upper},workdir={work}", str(board))
            mounted.append(board)
        except subprocess.CalledProcessError:
            subprocess.run(["cp", "-a", f"{root}/.", str(board)], check=True)
        _mount("-t", "proc", "proc", str(board / "proc"))
        mounted.append(board / "proc")
        _mount("-t", "sysfs", "sysfs", str(board / "sys"))
        mounted.append(board / "sys")
        # qemu-user (7.2, bookworm) passes the x86 host's CPU description through: sysfs
        # lists CPUs while /proc/cpuinfo has no ARM entries, and ONNX Runtime's cpuinfo
        # library segfaults at import on that mix. An empty CPU directory makes it fall back
        # with a warning instead; a real board describes its own ARM cores.
        cpu = board / "sys" / "devices" / "system" / "cpu"
        _mount("-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", str(cpu))
        mounted.append(cpu)
        yield board
    finally:
        for path in reversed(mounted):
            _umount(path)


def _chroot(board: Path, *cmd: str, net: bool = True) -> list[str]:
    return [*([] if net else ["unshare", "--net"]), "chroot", str(board), *cmd]


def test_federation_with_an_emulated_aarch64_board(tmp_path: Path, mosquitto: str) -> None:
    t0 = time.monotonic()
    root = _emulation_root()
    t_root = time.monotonic() - t0
    pyver = subprocess.run(["chroot", str(root), "/usr/bin/python3", "-c",
                            "import platform, sys; print(platform.machine(), "
                            "'%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, check=True, env=BOARD_ENV,
                           timeout=60).stdout.split()
    assert pyver[0] == "aarch64", pyver

    pack = tmp_path / "pack"
    built = subprocess.run(heron("devices", "pack", "--target", "linux-aarch64", "--python",
                                 pyver[1], "--out", str(pack), "--broker", mosquitto,
                                 "--profile", "rpi4"),
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    assert not list((pack / "wheels").glob("torch*"))
    shards = tmp_path / "shards"
    subprocess.run(heron("devices", "partition", "--devices", "2", "--out", str(shards)),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)

    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    with _board(root, tmp_path) as board:
        try:
            shutil.copytree(pack, board / "root" / "pack")
            t1 = time.monotonic()
            # the board has no network at all while installing: --no-index or nothing
            inst = subprocess.run(_chroot(board, "sh", "/root/pack/install.sh", "--no-service",
                                          "--id", "arm-0", net=False),
                                  capture_output=True, text=True, env=BOARD_ENV, timeout=900)
            t_install = time.monotonic() - t1
            assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-3000:]
            assert "installed heron" in inst.stdout
            shutil.copy(shards / "dev-1.npz", board / "var" / "lib" / "heron" / "shard.npz")

            t2 = time.monotonic()
            server = subprocess.Popen(
                heron("server", "--broker", mosquitto, "--out", str(out), "--devices", "2",
                      "--rounds", "2", "--local-steps", "6", "--batch-size", "16",
                      "--join-timeout", "500", "--round-timeout", "500"),
                cwd=ROOT, stdout=subprocess.PIPE, stderr=(logs / "server.log").open("w"),
                text=True)
            procs.append(server)
            # everything else from /etc/heron/device.toml as install.sh wrote it
            procs.append(subprocess.Popen(
                _chroot(board, "/opt/heron/venv/bin/heron", "device", "--config",
                        "/etc/heron/device.toml", "--threads", "1"),
                stdout=(logs / "arm-0.log").open("w"), stderr=subprocess.STDOUT,
                env=BOARD_ENV, stdin=subprocess.DEVNULL))
            procs.append(subprocess.Popen(
                heron("device", "--broker", mosquitto, "--id", "dev-0", "--data",
                      str(shards / "dev-0.npz"), "--threads", "1"),
                cwd=ROOT, stdout=(logs / "dev-0.log").open("w"), stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL))
            deadline = time.monotonic() + 900
            while server.poll() is None and time.monotonic() < deadline:
                # a board that dies early (bad install, missing file) fails the test now,
                # not after the server's join timeout
                early = [p for p in procs[1:] if p.poll() not in (None, 0)]
                assert not early, (logs / "arm-0.log").read_text()[-3000:]
                time.sleep(0.5)
            stdout, _ = server.communicate(timeout=30)
            codes = [p.wait(timeout=120) for p in procs[1:]]
            t_run = time.monotonic() - t2
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    arm_log = (logs / "arm-0.log").read_text()
    assert server.returncode == 0, (logs / "server.log").read_text()[-3000:] + arm_log[-3000:]
    assert codes == [0, 0], arm_log[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == ["arm-0", "dev-0"]
    arm = summary["device_profiles"]["arm-0"]
    assert arm["machine"] == "aarch64" and arm["python"].startswith(pyver[1])
    assert arm["profile"] == "rpi4" and arm["budget_mb"] == 3072
    assert arm["memory_batch"] == 16 and 0 < arm["memory_mb"] <= 3072  # dry run at join
    assert summary["device_profiles"]["dev-0"]["machine"] == "x86_64"
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:  # the emulated board's update arrived and was averaged, every round
        assert r["updates"] == ["arm-0", "dev-0"] and r["smashed_batches"] > 0
    assert summary["device_peak_rss_mb"]["arm-0"] > 0
    assert "bundle cnn/conv1 ready" in arm_log and "memory check: batch size 16" in arm_log
    assert "round 2 done" in arm_log
    print(f"\naarch64 emulation (qemu-user; not a board's speed): root {t_root:.0f} s, "
          f"offline install {t_install:.0f} s, 2-round federation {t_run:.0f} s")
