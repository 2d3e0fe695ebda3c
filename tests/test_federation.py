"""Whole federations over real brokers, with every part a real process."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, heron

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FAST = ["--rounds", "10", "--local-steps", "30"]


def _summary(out: Path, rounds: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    for key in ("algorithm", "model", "dataset", "devices", "rounds", "final_test_accuracy",
                "test_accuracy_per_round", "bytes_up", "bytes_down", "device_peak_rss_mb",
                "wall_seconds"):
        assert key in summary, key
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == list(range(1, rounds + 1))
    assert len(summary["test_accuracy_per_round"]) == rounds
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    return summary


def test_heron_run_embedded_broker_devices_without_torch(tmp_path: Path,
                                                         no_torch_env: dict) -> None:
    """`heron run` with its embedded broker; device processes cannot import torch."""
    from devices.fleet import FleetOptions, make_shards, start_devices, stop_all
    from server.broker import EmbeddedBroker

    out = tmp_path / "run"
    fleet = FleetOptions(out=out, devices=3, device_env={"PYTHONPATH":
                                                         no_torch_env["PYTHONPATH"]})
    shards = make_shards(fleet, out / "shards")
    with EmbeddedBroker() as broker:
        devices = start_devices(fleet, broker.url, shards)
        server = subprocess.run(heron("server", "--broker", broker.url, "--out", str(out),
                                      "--devices", "3", *FAST),
                                cwd=ROOT, capture_output=True, text=True, timeout=240)
        codes = stop_all(devices)
    assert server.returncode == 0, server.stderr[-3000:]
    assert codes == [0, 0, 0], [(out / "logs" / f"dev-{i}.log").read_text()[-2000:]
                                for i in range(3)]
    summary = _summary(out, 10)
    assert summary["final_test_accuracy"] > 0.8  # chance is 0.1
    assert set(summary["device_peak_rss_mb"]) == {"dev-0", "dev-1", "dev-2"}
    for i in range(3):
        assert "ModuleNotFoundError" not in (out / "logs" / f"dev-{i}.log").read_text()


def test_heron_run_command_end_to_end(tmp_path: Path) -> None:
    """The README's main command, shortened: broker, server and devices all started by it."""
    out = tmp_path / "run"
    proc = subprocess.run(heron("run", "--out", str(out), *FAST), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "round  10/10" in proc.stdout and "final test accuracy" in proc.stdout
    summary = _summary(out, 10)
    assert summary["final_test_accuracy"] > 0.8
    assert len(list((out / "shards").glob("dev-*.npz"))) == 3


def test_by_hand_over_mosquitto(tmp_path: Path, mosquitto: str) -> None:
    """partition, server and devices as separate commands against a stock Mosquitto."""
    shards = tmp_path / "shards"
    part = subprocess.run(heron("devices", "partition", "--dataset", "digits", "--devices", "3",
                                "--partition", "dirichlet", "--alpha", "1.0",
                                "--out", str(shards)),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert part.returncode == 0, part.stderr
    assert sorted(p.name for p in shards.glob("*.npz")) == ["dev-0.npz", "dev-1.npz",
                                                            "dev-2.npz"]
    out = tmp_path / "server"
    server = subprocess.Popen(heron("server", "--broker", mosquitto, "--out", str(out),
                                    "--devices", "3", *FAST),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    devs = [subprocess.Popen(heron("device", "--broker", mosquitto, "--id", f"dev-{i}",
                                   "--data", str(shards / f"dev-{i}.npz"), "--threads", "1"),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
            for i in range(3)]
    stdout, stderr = server.communicate(timeout=240)
    logs = [d.communicate(timeout=60)[0] for d in devs]
    assert server.returncode == 0, stderr[-3000:]
    assert [d.returncode for d in devs] == [0, 0, 0], [log[-1500:] for log in logs]
    assert all("bundle cnn/conv1 ready" in log for log in logs)  # received over MQTT
    summary = _summary(out, 10)
    assert summary["final_test_accuracy"] > 0.8


def test_heron_run_against_external_broker(tmp_path: Path, mosquitto: str) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(heron("run", "--broker", mosquitto, "--out", str(out), "--rounds", "3",
                                "--devices", "2"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded MQTT broker" not in proc.stdout
    assert _summary(out, 3)["final_test_accuracy"] > 0.5


def test_device_with_local_bundle(tmp_path: Path, mosquitto: str) -> None:
    """A device that ships with its bundle does not download it (same export, same sha)."""
    shards = tmp_path / "shards"
    subprocess.run(heron("devices", "partition", "--devices", "1", "--out", str(shards)),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    bundle = tmp_path / "bundle"
    subprocess.run(heron("export", "--model", "cnn", "--dataset", "digits", "--out", str(bundle)),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    out = tmp_path / "server"
    server = subprocess.Popen(heron("server", "--broker", mosquitto, "--out", str(out),
                                    "--devices", "1", "--rounds", "2"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    dev = subprocess.run(heron("device", "--broker", mosquitto, "--id", "dev-0", "--data",
                               str(shards / "dev-0.npz"), "--bundle", str(bundle)),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr[-2000:]
    assert dev.returncode == 0, dev.stderr[-2000:]
    assert "sent bundle" not in stderr
    _summary(out, 2)


def test_device_reports_dead_broker(tmp_path: Path) -> None:
    from conftest import free_port

    shards = tmp_path / "shards"
    subprocess.run(heron("devices", "partition", "--devices", "1", "--out", str(shards)),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    proc = subprocess.run(heron("device", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                                "--id", "dev-0", "--data", str(shards / "dev-0.npz")),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot reach the MQTT broker" in proc.stderr


def test_server_side_commands_name_the_extra(no_torch_env: dict) -> None:
    proc = subprocess.run(heron("server", "--broker", "mqtt://127.0.0.1:1", "--out", "x"),
                          cwd=ROOT, env=no_torch_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "[server]" in proc.stderr


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """Standard MNIST idx format: big-endian magic (0x0803 images, 0x0801 labels), dims."""
    magic = 0x0800 | arr.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_heron_run_on_mnist_format_files(tmp_path: Path) -> None:
    """`--dataset mnist --data-dir DIR` on files named and laid out as MNIST ships them."""
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist"
    data.mkdir()
    textures = np.tile(rng.integers(0, 2, (10, 4, 4)), (1, 7, 7)) * 200  # one per class
    for split, n in (("train", 600), ("t10k", 200)):
        labels = rng.integers(0, 10, n)
        images = textures[labels] + rng.integers(0, 56, (n, 28, 28))
        _write_idx(data / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels)
    out = tmp_path / "run"
    proc = subprocess.run(heron("run", "--dataset", "mnist", "--data-dir", str(data), "--out",
                                str(out), "--rounds", "6"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(out, 6)
    assert summary["dataset"] == "mnist"
    assert summary["final_test_accuracy"] > 0.5


def test_heron_run_resume_after_the_whole_fleet_was_killed(tmp_path: Path) -> None:
    """SIGKILL to every process of a `heron run`, then `heron run --resume DIR`."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    first = subprocess.Popen(heron("run", "--out", str(out), "--rounds", "8", "--local-steps",
                                   "600", "--upload-every", "20"),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    assert first.stdout is not None
    for line in first.stdout:
        if line.startswith("round   3/8"):
            break
    time.sleep(0.3)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    completed = len((out / "metrics.jsonl").read_text().splitlines())
    assert 3 <= completed < 8
    second = subprocess.run(heron("run", "--resume", str(out)), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
    assert "resuming run" in second.stdout
    summary = _summary(out, 8)  # every round exactly once
    assert summary["final_test_accuracy"] > 0.8


def test_frozen_baseline_never_changes_the_device_weights(tmp_path: Path) -> None:
    """`--algorithm frozen`: only the server trains; the device part stays as exported."""
    import torch

    from edge_runtime.bundle import load_bundle

    out = tmp_path / "run"
    proc = subprocess.run(heron("run", "--algorithm", "frozen", "--out", str(out), *FAST),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(out, 10)
    assert summary["algorithm"] == "frozen"
    start = load_bundle(out / "bundle").weights
    final = torch.load(out / "checkpoint.pt", weights_only=True)["device_weights"].numpy()
    assert np.array_equal(start, final)
    assert summary["final_test_accuracy"] > 0.5  # the server alone still learns


def test_heron_run_deterministic_repeats_itself(tmp_path: Path) -> None:
    """`--deterministic`: the same command twice gives the same accuracies, to the bit."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = subprocess.run(heron("run", "--out", str(out), "--deterministic", "--rounds",
                                    "3", "--local-steps", "10"),
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
        runs.append(_summary(out, 3))
    a, b = runs
    assert a["deterministic"] is True and b["deterministic"] is True
    assert a["final_test_accuracy"] == b["final_test_accuracy"]
    assert a["test_accuracy_per_round"] == b["test_accuracy_per_round"]
