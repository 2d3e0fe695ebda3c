"""Faults against a real Mosquitto and real processes: dead devices, stuck devices, a killed
server, a restarted broker. Each test is bounded in time."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, heron
from conftest import RestartableMosquitto as Mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Proc:
    """A heron process whose stdout lines are collected by a thread as they come."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen(heron(*args), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.p.poll() is not None and not self._t.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"never saw {text!r}; output:\n{''.join(self.lines)[-4000:]}")

    def finish(self, timeout: float = 180) -> int:
        rc = self.p.wait(timeout=timeout)
        self._t.join(5)
        return rc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.p.send_signal(sig)

    def text(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path, persistence=True)
    m.start()
    yield m
    if m.p is not None and m.p.poll() is None:
        m.kill()


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    subprocess.run(heron("devices", "partition", "--devices", "3", "--out", str(out)),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    return out


def device(broker: Mosquitto, shards: Path, i: int) -> Proc:
    return Proc("device", "--broker", broker.url, "--id", f"dev-{i}", "--data",
                str(shards / f"dev-{i}.npz"), "--threads", "1")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stop(procs: list[Proc]) -> None:
    for p in procs:
        if p.p.poll() is None:
            p.kill(signal.SIGTERM)
        try:
            p.finish(20)
        except subprocess.TimeoutExpired:
            p.kill()


SLOW_ROUNDS = ["--local-steps", "600", "--upload-every", "10"]  # about 1 s of training a round


def test_dead_device_does_not_stall_the_round_and_rejoins(tmp_path: Path, broker: Mosquitto,
                                                          shards: Path) -> None:
    out = tmp_path / "run"
    server = Proc("server", "--broker", broker.url, "--out", str(out), "--devices", "3",
                  "--rounds", "6", "--round-timeout", "120", *SLOW_ROUNDS)
    devs = [device(broker, shards, i) for i in range(3)]
    try:
        server.wait_for("round   1/6")
        devs[2].kill()  # SIGKILL: its last will fires
        server.wait_for("round   3/6")
        devs[2] = device(broker, shards, 2)  # comes back
        assert server.finish() == 0, server.text()[-3000:]
    finally:
        stop(devs)
    recs = metrics(out)
    assert [r["round"] for r in recs] == list(range(1, 7))
    dropped = [r for r in recs if "dev-2" in r["participants"] and "dev-2" not in r["updates"]]
    assert dropped, "dev-2 was never dropped from a round it was picked for"
    assert all(r["round_seconds"] < 60 for r in dropped)  # closed without waiting for timeout
    assert "dev-2" in recs[-1]["updates"]  # rejoined and took part again
    assert recs[-1]["test_accuracy"] > 0.7  # chance: 0.1


def test_rounds_wait_for_devices_when_all_of_them_left(tmp_path: Path, broker: Mosquitto,
                                                      shards: Path) -> None:
    """A round with nobody ready would close at once, and every later one too: the run
    would end 'successfully' without training. The server waits for devices instead."""
    out = tmp_path / "run"
    server = Proc("server", "--broker", broker.url, "--out", str(out), "--devices", "2",
                  "--rounds", "4", "--round-timeout", "60", *SLOW_ROUNDS)
    devs = [device(broker, shards, i) for i in range(2)]
    try:
        server.wait_for("round   1/4")
        for d in devs:
            d.kill()  # SIGKILL: their last wills say offline
        server.wait_for("waiting up to --join-timeout", timeout=60)
        devs = [device(broker, shards, i) for i in range(2)]
        assert server.finish() == 0, server.text()[-3000:]
    finally:
        stop(devs)
    recs = metrics(out)
    assert [r["round"] for r in recs] == [1, 2, 3, 4]
    assert all(r["participants"] for r in recs), [r["participants"] for r in recs]
    assert recs[-1]["updates"], recs[-1]


def test_stuck_device_round_closes_at_min_devices_and_at_deadline(
        tmp_path: Path, broker: Mosquitto, shards: Path) -> None:
    out = tmp_path / "run"
    server = Proc("server", "--broker", broker.url, "--out", str(out), "--devices", "3",
                  "--rounds", "4", "--round-timeout", "8", "--min-devices", "2", *SLOW_ROUNDS)
    devs = [device(broker, shards, i) for i in range(3)]
    try:
        server.wait_for("round   1/4")
        devs[1].kill(signal.SIGSTOP)  # alive for the broker, silent for the server
        server.wait_for("round   3/4", timeout=120)
        devs[1].kill(signal.SIGCONT)
        assert server.finish() == 0, server.text()[-3000:]
    finally:
        stop(devs)
    recs = metrics(out)
    assert [r["round"] for r in recs] == [1, 2, 3, 4]
    stuck = [r for r in recs[1:3] if "dev-1" not in r["updates"]]
    assert stuck and all(len(r["updates"]) >= 2 for r in stuck)
    assert all(r["round_seconds"] < 8 for r in stuck)  # min-devices closed it, not the deadline


def test_round_deadline_closes_a_round_with_what_arrived(tmp_path: Path, broker: Mosquitto,
                                                         shards: Path) -> None:
    out = tmp_path / "run"
    server = Proc("server", "--broker", broker.url, "--out", str(out), "--devices", "2",
                  "--rounds", "3", "--round-timeout", "4", *SLOW_ROUNDS)
    devs = [device(broker, shards, i) for i in range(2)]
    try:
        server.wait_for("round   1/3")
        devs[1].kill(signal.SIGSTOP)
        server.wait_for("round   2/3", timeout=60)
        devs[1].kill(signal.SIGCONT)
        assert server.finish() == 0, server.text()[-3000:]
    finally:
        stop(devs)
    rec = metrics(out)[1]
    if "dev-1" not in rec["updates"]:  # it was frozen before sending: the deadline closed it
        assert rec["updates"] == ["dev-0"] and rec["round_seconds"] >= 4


def test_server_killed_and_resumed_loses_and_repeats_no_round(tmp_path: Path,
                                                              broker: Mosquitto,
                                                              shards: Path) -> None:
    out = tmp_path / "run"
    args = ("server", "--broker", broker.url, "--out", str(out), "--devices", "3",
            "--rounds", "6", *SLOW_ROUNDS)
    devs = [device(broker, shards, i) for i in range(3)]
    try:
        first = Proc(*args)
        first.wait_for("round   2/6")
        time.sleep(0.5)  # somewhere inside round 3
        first.kill()
        first.finish(10)
        done_before = [r["round"] for r in metrics(out)]
        second = Proc(*args, "--resume")
        assert second.finish() == 0, second.text()[-3000:]
        assert f"after round {done_before[-1]}" in second.text() or \
            f"after round {done_before[-1] + 1}" in second.text()
    finally:
        stop(devs)
    assert [r["round"] for r in metrics(out)] == list(range(1, 7))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy_per_round"] == [r["test_accuracy"] for r in metrics(out)]
    assert summary["final_test_accuracy"] > 0.7  # chance: 0.1
    assert [d.finish(30) for d in devs] == [0, 0, 0]  # they followed the resumed server


def test_broker_restart_mid_round(tmp_path: Path, broker: Mosquitto, shards: Path) -> None:
    out = tmp_path / "run"
    server = Proc("server", "--broker", broker.url, "--out", str(out), "--devices", "3",
                  "--rounds", "5", "--round-timeout", "60", *SLOW_ROUNDS)
    devs = [device(broker, shards, i) for i in range(3)]
    try:
        server.wait_for("round   2/5")
        time.sleep(0.3)
        broker.kill()
        time.sleep(2)
        broker.start()
        assert server.finish(240) == 0, server.text()[-3000:]
    finally:
        stop(devs)
    recs = metrics(out)
    assert [r["round"] for r in recs] == [1, 2, 3, 4, 5]
    assert len(recs[-1]["updates"]) == 3, (  # everyone reconnected by themselves
        server.text()[-3000:] + "".join(d.text()[-1500:] for d in devs))
    assert recs[-1]["test_accuracy"] > 0.7  # chance: 0.1


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    """A failure mid-write leaves the previous checkpoint intact and no stray file."""
    import torch

    from server.records import save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 1, "w": torch.arange(3)})

    class Boom:
        def __reduce__(self) -> tuple:
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"round": 2, "bad": Boom()})
    assert torch.load(path, weights_only=True)["round"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
