"""Every algorithm of issue 3 completes a federation over the embedded broker (`heron run`)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, heron

from edge_runtime.bundle import load_bundle

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SHORT = ["--rounds", "6", "--local-steps", "20", "--devices", "2"]


def _run(tmp_path: Path, algorithm: str, *extra: str) -> tuple[dict, list[dict], Path]:
    out = tmp_path / algorithm
    proc = subprocess.run(heron("run", "--algorithm", algorithm, "--out", str(out), *SHORT,
                                *extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    logs = "".join((out / "logs" / f"dev-{i}.log").read_text()[-1500:] for i in range(2)) \
        if (out / "logs").exists() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:] + logs
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["algorithm"] == algorithm
    assert [r["round"] for r in records] == list(range(1, 7))
    assert all(r["updates"] == ["dev-0", "dev-1"] for r in records), records
    return summary, records, out


@pytest.mark.parametrize("algorithm", ["heron", "heron-tail", "cse-fsl", "sflv1", "sflv2", "fedavg",
                                       "frozen"])
def test_every_algorithm_completes_a_federation(tmp_path: Path, algorithm: str) -> None:
    summary, records, out = _run(tmp_path, algorithm)
    assert summary["final_test_accuracy"] > 0.3, summary["test_accuracy_per_round"]  # chance 0.1
    start = load_bundle(out / "bundle").weights
    final = torch.load(out / "checkpoint.pt", weights_only=True)["device_weights"].numpy()
    n = start.size
    if algorithm == "frozen":
        assert np.array_equal(final, start)
    else:
        assert not np.array_equal(final[:n], start)
    per_round = [r["smashed_batches"] for r in records]
    steps = 20 * 2
    if algorithm in ("sflv1", "sflv2"):
        # a smashed batch every step, and a gradient of the same size back for each
        assert per_round == [steps] * 6
        assert summary["bytes_down"] > 0.9 * summary["bytes_up"]
    elif algorithm == "fedavg":
        assert per_round == [0] * 6
        assert final.size > n  # the server part travels with the device weights
    else:  # aux-head protocol: every k = 2 steps
        assert per_round == [steps // 2] * 6
        assert final.size == n


def test_sflv1_keeps_per_device_server_copies_and_averages_them(tmp_path: Path) -> None:
    """V1 and V2 see identical device traffic but train the server differently."""
    v1, _, _ = _run(tmp_path, "sflv1", "--rounds", "6")
    v2, _, _ = _run(tmp_path, "sflv2", "--rounds", "6")
    assert v1["test_accuracy_per_round"] != v2["test_accuracy_per_round"]


def test_an_onnx_device_is_refused_by_a_first_order_server(tmp_path: Path,
                                                           embedded_broker: str) -> None:
    """A torch algorithm with the wrong device kind fails fast with a hint, not a hang."""
    from devices.fleet import FleetOptions, make_shards, start_devices, stop_all

    out = tmp_path / "run"
    fleet = FleetOptions(out=out, devices=1)  # ONNX Runtime devices (no --torch)
    shards = make_shards(fleet, out / "shards")
    devices = start_devices(fleet, embedded_broker, shards)
    try:
        server = subprocess.run(heron("server", "--broker", embedded_broker, "--out", str(out),
                                      "--devices", "1", "--algorithm", "cse-fsl",
                                      "--join-timeout", "8"),
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        for p in devices:
            p.terminate()
        stop_all(devices, grace=5)
    assert server.returncode != 0
    assert "wrong device kind" in server.stderr and "--torch" in server.stderr, \
        server.stderr[-2000:]


def test_block_wise_zo_runs_in_the_federation(tmp_path: Path) -> None:
    """`--zo-perturb block` reaches the devices through the round config and trains."""
    summary, _, out = _run(tmp_path, "heron", "--zo-perturb", "block")
    assert summary["config"]["train"]["zo"]["perturb"] == "block"
    # each device carries its block sampler from round to round: only round 1 starts uniform
    log = (out / "logs" / "dev-0.log").read_text()
    starts = re.findall(r"round (\d+) block draw probabilities (\S+|\[[^]]*\]) ->", log)
    assert [int(r) for r, _ in starts] == list(range(1, 7)), log[-2000:]
    assert starts[0][1] == "uniform" and all(p.startswith("[") for _, p in starts[1:])
    assert summary["final_test_accuracy"] > 0.3
    start = load_bundle(out / "bundle").weights
    final = torch.load(out / "checkpoint.pt", weights_only=True)["device_weights"].numpy()
    assert not np.array_equal(final, start)
