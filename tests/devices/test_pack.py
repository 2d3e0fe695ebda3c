"""`heron devices pack`: real wheels from the package index for another platform, an offline
install of an x86-64 pack into a fresh venv, and clear refusals for targets heron cannot serve."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, heron
from packaging.requirements import Requirement

from edge_runtime.profiles import DEVICE_CONFIG_KEYS, parse_toml

pytestmark = pytest.mark.slow  # pip downloads ~40 MB of wheels per pack (cached by pip)


def _pack(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(heron("devices", "pack", "--out", str(out), *args), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _wheel(names: list[str], project: str) -> str:
    found = [n for n in names if n.lower().startswith(project + "-")]
    assert len(found) == 1, (project, names)
    return found[0]


def test_linux_aarch64_pack(tmp_path: Path) -> None:
    out = tmp_path / "pack"
    proc = _pack(out, "--target", "linux-aarch64", "--python", "3.11",
                 "--broker", "mqtt://10.0.0.5:1883", "--profile", "rpi4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = float(re.search(r"wheels for linux-aarch64 / CPython 3.11, ([\d.]+) MB",
                           proc.stdout).group(1))
    names = sorted(p.name for p in (out / "wheels").glob("*.whl"))
    assert not [n for n in names if n.lower().startswith("torch")], names  # never torch
    own = _wheel(names, "heron_sfl")
    assert own.endswith("-py3-none-any.whl")
    for project in ("onnxruntime", "numpy", "psutil"):
        assert "aarch64" in _wheel(names, project)
    assert _wheel(names, "onnxruntime").split("-")[2] == "cp311"
    _wheel(names, "paho_mqtt")
    assert 20 < size < 200  # ~42 MB today: onnxruntime 23, numpy 16
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    assert abs(on_disk - size) < 0.1

    with zipfile.ZipFile(out / "wheels" / own) as zf:  # profiles ship as package data
        files = zf.namelist()
        meta = zf.read(next(n for n in files if n.endswith("METADATA"))).decode()
    assert {f"edge_runtime/boards/{n}.toml" for n in ("rpi4", "rpi-zero-2w", "jetson-nano",
                                                  "generic")} <= set(files)
    runtime = [Requirement(line.split(":", 1)[1]) for line in meta.splitlines()
               if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.name for r in runtime) == [
        "numpy", "onnxruntime", "paho-mqtt", "psutil", "tomli"]
    assert [str(r.marker) for r in runtime if r.name == "tomli"] == ['python_version < "3.11"']

    manifest = json.loads((out / "pack.json").read_text())
    assert manifest["machine"] == "aarch64" and manifest["python"] == "3.11"
    for name, sha in manifest["wheels"].items():
        assert hashlib.sha256((out / "wheels" / name).read_bytes()).hexdigest() == sha
    assert sorted(manifest["wheels"]) == names

    cfg = parse_toml((out / "device.toml").read_text())
    assert cfg["broker"] == "mqtt://10.0.0.5:1883" and cfg["profile"] == "rpi4"
    assert set(cfg) <= set(DEVICE_CONFIG_KEYS)
    unit = (out / "heron-device.service").read_text()
    assert "Restart=on-failure" in unit and "RestartPreventExitStatus=5" in unit
    assert "ExecStart=/opt/heron/venv/bin/heron device --config /etc/heron/device.toml" in unit
    install = (out / "install.sh").read_text()
    assert os.access(out / "install.sh", os.X_OK) and "--no-index" in install
    assert '"$got" = "aarch64 3.11"' in install  # refuses a board it was not built for
    subprocess.run(["sh", "-n", str(out / "install.sh")], check=True)


def test_x86_64_pack_installs_offline_and_checks_memory(tmp_path: Path) -> None:
    """The whole path on this machine's own platform: pack, install with no network, then the
    installed `heron device` (no torch in its venv) runs a dry run from its config file."""
    out = tmp_path / "pack"
    if platform.machine() != "x86_64":
        pytest.skip(f"installs an x86-64 pack natively; this machine is {platform.machine()}")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    proc = _pack(out, "--target", "linux-x86_64", "--python", pyver, "--profile", "generic")
    assert proc.returncode == 0, proc.stderr[-3000:]
    prefix = tmp_path / "board"
    cmd = ["sh", str(out / "install.sh"), "--prefix", str(prefix), "--config-dir",
           str(prefix / "etc"), "--data-dir", str(prefix / "data"), "--no-service",
           "--id", "x86-board", "--broker", "mqtt://127.0.0.1:1883", "--python", sys.executable]
    if os.geteuid() == 0 and shutil.which("unshare"):
        cmd = ["unshare", "--net", *cmd]  # no network at all, loopback included
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    inst = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-3000:]
    assert "wrote" in inst.stdout and "x86-board" in inst.stdout
    py = prefix / "venv" / "bin" / "python"
    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True,
                              env=env, cwd=tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    subprocess.run(heron("devices", "partition", "--devices", "1", "--out",
                         str(prefix / "data")), cwd=ROOT, check=True, capture_output=True,
                   timeout=60)
    (prefix / "data" / "dev-0.npz").rename(prefix / "data" / "shard.npz")
    subprocess.run(heron("export", "--model", "cnn", "--dataset", "digits", "--out",
                         str(tmp_path / "bundle")), cwd=ROOT, check=True, capture_output=True,
                   timeout=120)
    dry = subprocess.run([str(prefix / "venv" / "bin" / "heron"), "device", "--config",
                          str(prefix / "etc" / "device.toml"), "--dry-run", "--bundle",
                          str(tmp_path / "bundle")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "profile generic, 2 ONNX Runtime threads" in dry.stdout  # from the installed wheel
    assert "fits: batch size 32" in dry.stdout


def test_no_wheel_for_a_dependency_names_it_and_stops(tmp_path: Path) -> None:
    out = tmp_path / "pack"
    proc = _pack(out, "--target", "linux-armv7l")
    assert proc.returncode == 2
    assert "onnxruntime has no wheel for linux-armv7l / CPython 3.11" in proc.stderr
    assert "help:" in proc.stderr and "linux-aarch64" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("pack*"))  # nothing half-built left


def test_python_too_old_and_unknown_target(tmp_path: Path) -> None:
    proc = _pack(tmp_path / "p37", "--python", "3.7")
    assert proc.returncode == 2
    assert "needs Python >=3.10" in proc.stderr and "help:" in proc.stderr
    proc = _pack(tmp_path / "win", "--target", "windows-amd64")
    assert proc.returncode == 2 and "unknown target 'windows-amd64'" in proc.stderr
    proc = _pack(tmp_path / "p", "--profile", "rpi5")
    assert proc.returncode == 2 and "no board profile named 'rpi5'" in proc.stderr


def test_pack_does_not_overwrite_other_directories(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("x")
    proc = _pack(tmp_path, "--target", "linux-x86_64")
    assert proc.returncode == 2 and "is not a heron pack" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "x"
