"""A hostile or broken client on the broker: the server logs, counts and survives every
kind of bad input, and none of it reaches the global model."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, heron

from edge_runtime.protocol import (
    MAX_CHUNK_PAYLOAD,
    RoundStart,
    Smashed,
    Update,
    chunk,
    encode,
    topics,
)
from edge_runtime.transport import MqttTransport

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Rogue:
    """Publishes garbage as soon as each round starts, using real run ids and rounds."""

    def __init__(self, url: str) -> None:
        self.t = MqttTransport(url, "rogue", [topics.down_all("round")], persistent=False)
        self.sent: list[str] = []
        self.stop = threading.Event()

    def raw(self, topic: str, payload: bytes) -> None:
        self.t._client.publish(topic, payload, qos=1)

    def attack(self, start: RoundStart) -> None:
        run, r, d = start.run_id, start.round, start.weights.size
        up = topics.up
        self.raw(up("dev-0", "update"), b"\x00garbage, not a heron chunk")
        whole = chunk(encode(Update(run, r, "dev-0", weights=np.zeros(d, np.float32),
                                    num_samples=5)), "0" * 32)[0]
        self.raw(up("dev-0", "update"), whole[:40])  # truncated chunk
        self.raw(up("dev-0", "update"), whole[:-7])  # truncated message body
        self.raw(up("dev-0", "smashed"), b"HRC1" + b"\x00" * (MAX_CHUNK_PAYLOAD + 10))
        first = chunk(encode(Update(run, r, "dev-0", weights=np.zeros(d, np.float32),
                                    num_samples=5)), "1" * 32, max_payload=200)
        self.raw(up("dev-0", "update"), first[0])  # a chunked message missing its other parts
        bad = [
            ("dev-1", Update(run, r, "dev-1", weights=np.full(d, np.nan, np.float32),
                             num_samples=10)),
            ("dev-1", Update(run, r, "dev-1", weights=np.zeros(d + 3, np.float32),
                             num_samples=10)),
            ("dev-1", Update(run, r, "dev-1", weights=np.full(d, 1e9, np.float32),
                             num_samples=10)),
            ("dev-1", Update(run, r, "dev-1", weights=np.zeros(d, np.float64),
                             num_samples=10)),
            ("dev-0", Smashed(run, r, "dev-0", activations=np.full((4, 16, 8, 8), np.inf,
                                                                  np.float32),
                              labels=np.zeros(4, np.int64))),
            ("dev-0", Smashed(run, r, "dev-0", activations=np.zeros((4, 3, 3), np.float32),
                              labels=np.zeros(4, np.int64))),
            ("dev-0", Update(run, r + 5, "dev-0", weights=np.zeros(d, np.float32),
                             num_samples=1)),
            ("dev-0", Update("someone-elses-run", r, "dev-0",
                             weights=np.zeros(d, np.float32), num_samples=1)),
            ("dev-9", Update(run, r, "dev-9", weights=np.zeros(d, np.float32),
                             num_samples=1)),
            ("dev-0", Update(run, r, "dev-1", weights=np.zeros(d, np.float32),
                             num_samples=1)),
        ]
        for dev, msg in bad:
            self.t.publish(up(dev, msg.kind), msg)

    def run(self) -> None:
        self.t.start()
        while not self.stop.is_set():
            inc = self.t.get(0.2)
            if inc is not None and isinstance(inc.message, RoundStart) and \
                    inc.message.round <= 2:
                self.attack(inc.message)
        self.t.stop()


def test_server_survives_and_rejects_every_kind_of_bad_input(tmp_path: Path,
                                                             mosquitto: str) -> None:
    shards = tmp_path / "shards"
    subprocess.run(heron("devices", "partition", "--devices", "2", "--out", str(shards)),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    rogue = Rogue(mosquitto)
    thread = threading.Thread(target=rogue.run, daemon=True)
    thread.start()
    out = tmp_path / "run"
    # An open broker: the rogue writes on the honest devices' own topics, and quarantine
    # goes by topic, so it would quarantine them; tests/server/test_attacks.py has it on a
    # provisioned fleet, where a topic is its device's login.
    server = subprocess.Popen(heron("server", "--broker", mosquitto, "--out", str(out),
                                    "--devices", "2", "--rounds", "8", "--round-timeout", "60",
                                    "--local-steps", "300", "--upload-every", "10",
                                    "--quarantine-after", "0"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    devs = [subprocess.Popen(heron("device", "--broker", mosquitto, "--id", f"dev-{i}",
                                   "--data", str(shards / f"dev-{i}.npz"), "--threads", "1"),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(2)]
    try:
        _, log = server.communicate(timeout=240)
    finally:
        rogue.stop.set()
        thread.join(10)
        for d in devs:
            d.wait(60)
    assert server.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rejected = summary["rejected"]
    for kind in ("malformed payload", "bad update", "bad smashed data", "future round",
                 "wrong run", "unknown device", "spoofed sender"):
        assert rejected.get(kind, 0) >= 1, (kind, rejected)
    assert "oversized chunk" in log and "NaN or Inf" in log and "dev-9" in log
    # nothing bad reached the model: finite weights, and it learned
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert torch.isfinite(ckpt["device_weights"]).all()
    assert float(ckpt["device_weights"].abs().max()) < 100
    assert summary["final_test_accuracy"] > 0.8


def test_device_refuses_a_tampered_bundle(tmp_path: Path, mosquitto: str) -> None:
    bundle = tmp_path / "bundle"
    subprocess.run(heron("export", "--out", str(bundle)), cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
    weights = bytearray((bundle / "weights.bin").read_bytes())
    weights[0] ^= 0xFF
    (bundle / "weights.bin").write_bytes(bytes(weights))
    shards = tmp_path / "shards"
    subprocess.run(heron("devices", "partition", "--devices", "1", "--out", str(shards)),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    proc = subprocess.run(heron("device", "--broker", mosquitto, "--id", "dev-0", "--data",
                                str(shards / "dev-0.npz"), "--bundle", str(bundle)),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "weights.bin sha256" in proc.stderr and "does not match" in proc.stderr
