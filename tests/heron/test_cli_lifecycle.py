"""Stopping real heron processes: `heron run` under SIGTERM, Ctrl-C and SIGKILL, `heron
server` and `heron device` under SIGTERM, and a run whose disk fills up. Each is bounded in
time and checks that no process is left and that what was kept on disk is consistent."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, heron

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROUNDS = 6
SLOW_ROUNDS = ["--devices", "2", "--rounds", str(ROUNDS), "--local-steps", "60",
               "--upload-every", "10"]  # a second or two a round


class Run:
    """A heron process whose output lines a thread collects as they come."""

    def __init__(self, *args: str, new_session: bool = False) -> None:
        self.p = subprocess.Popen(heron(*args), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  start_new_session=new_session)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.p.poll() is not None and not self._t.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"never saw {text!r}; output:\n{self.text()[-4000:]}")

    def finish(self, timeout: float) -> int:
        rc = self.p.wait(timeout=timeout)
        self._t.join(10)
        return rc

    def text(self) -> str:
        return "".join(self.lines)

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.p.pid).children(recursive=True)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """Whatever a test started is killed at its end, with its children, whatever happened."""
    started: list[Run] = []
    yield started
    for r in started:
        leftovers = []
        try:
            leftovers = r.children()
        except psutil.NoSuchProcess:
            pass
        r.kill()
        for c in leftovers:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass


def alive(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still running after `timeout` (a zombie, not yet reaped by whoever
    adopted it, has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def port_open(url: str) -> bool:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def kinds(procs: list[psutil.Process]) -> list[str]:
    """server / device, from `python -m heron KIND ...`."""
    return sorted(p.cmdline()[3] for p in procs)


def records(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text()
            .splitlines()]


def checkpoint_round(out: Path) -> int:
    from server.records import load_checkpoint

    return int(load_checkpoint(out / "checkpoint.pt")["round"])


def start_run(runs: list[Run], out: Path, *extra: str, new_session: bool = False) -> Run:
    run = Run("run", "--out", str(out), *SLOW_ROUNDS, *extra, new_session=new_session)
    runs.append(run)
    return run


def test_sigterm_stops_the_whole_run_and_resume_finishes_it(tmp_path: Path,
                                                            runs: list[Run]) -> None:
    out = tmp_path / "run"
    run = start_run(runs, out)
    broker = run.wait_for("embedded MQTT broker on ").split(" on ")[1].strip()
    run.wait_for(f"round   2/{ROUNDS}")
    children = run.children()
    assert kinds(children) == ["device", "device", "server"]
    run.p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert run.finish(60) == 143
    assert time.monotonic() - t0 < 45
    assert alive(children, 5) == []
    assert not port_open(broker)
    text = run.text()
    assert "heron run: SIGTERM: stopping the server" in text
    # the summary, the checkpoint and metrics.jsonl agree on what was completed
    summary = json.loads((out / "summary.json").read_text())
    done = summary["completed_rounds"]
    assert summary["interrupted"] is True and 2 <= done < ROUNDS
    assert f"stopped by SIGTERM after round {done}/{ROUNDS} (exit code 143)" in text
    assert checkpoint_round(out) == done and records(out) == list(range(1, done + 1))
    assert len(summary["test_accuracy_per_round"]) == done
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files
    for log in ("server.log", "dev-0.log", "dev-1.log"):
        assert "Traceback" not in (out / "logs" / log).read_text(), log

    again = subprocess.run(heron("run", "--resume", str(out)), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    assert f"resuming run {summary['run_id']} after round {done}" in again.stdout
    assert records(out) == list(range(1, ROUNDS + 1))  # every round exactly once
    final = json.loads((out / "summary.json").read_text())
    assert final["interrupted"] is False and final["completed_rounds"] == ROUNDS


def test_ctrl_c_to_the_process_group_stops_everything_with_130(tmp_path: Path,
                                                               runs: list[Run]) -> None:
    """Ctrl-C (and `timeout`) signal the whole group: every child gets SIGINT from the
    terminal and SIGTERM from `heron run`; each stops once, cleanly."""
    out = tmp_path / "run"
    run = start_run(runs, out, new_session=True)
    run.wait_for(f"round   1/{ROUNDS}")
    children = run.children()
    os.killpg(run.p.pid, signal.SIGINT)
    assert run.finish(60) == 130
    assert alive(children, 5) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert checkpoint_round(out) == summary["completed_rounds"] == len(records(out))
    for i in range(2):
        assert "stopped by SIGINT" in (out / "logs" / f"dev-{i}.log").read_text()


def test_children_stop_when_heron_run_is_killed(tmp_path: Path, runs: list[Run]) -> None:
    out = tmp_path / "run"
    run = start_run(runs, out)
    run.wait_for(f"round   1/{ROUNDS}")
    children = run.children()
    assert len(children) == 3
    run.p.kill()  # no chance to clean up: the kernel tells the children (PR_SET_PDEATHSIG)
    run.finish(10)
    assert alive(children, 30) == []
    summary = json.loads((out / "summary.json").read_text())  # the server stopped cleanly
    assert summary["interrupted"] is True
    assert checkpoint_round(out) == summary["completed_rounds"] == len(records(out))


# -- the parts alone ------------------------------------------------------------------------
def retained(broker: str, topic: str) -> object:
    from edge_runtime.transport import MqttTransport

    t = MqttTransport(broker, f"probe-{os.getpid()}-{time.monotonic_ns()}", [topic],
                      persistent=False)
    t.start()
    try:
        inc = t.get(timeout=5)
        return inc.message if inc is not None else None
    finally:
        t.stop()


def test_heron_server_stops_on_sigterm_and_says_offline(tmp_path: Path, runs: list[Run],
                                                        embedded_broker: str) -> None:
    from edge_runtime.protocol import topics

    out = tmp_path / "server"
    server = Run("server", "--broker", embedded_broker, "--out", str(out), "--devices", "1")
    runs.append(server)
    server.wait_for("waiting for devices: 0/1")
    assert getattr(retained(embedded_broker, topics.server_status()), "state", None) == "online"
    server.p.send_signal(signal.SIGTERM)
    assert server.finish(30) == 143
    assert "heron server: stopped by SIGTERM after round 0/20" in server.text()
    assert getattr(retained(embedded_broker, topics.server_status()), "state", None) == "offline"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["completed_rounds"] == 0


def test_heron_device_stops_on_sigterm_and_says_offline(tmp_path: Path, runs: list[Run],
                                                        embedded_broker: str) -> None:
    from devices.fleet import FleetOptions, make_shards
    from edge_runtime.protocol import topics

    [shard] = make_shards(FleetOptions(out=tmp_path, devices=1), tmp_path / "shards")
    device = Run("device", "--broker", embedded_broker, "--id", "dev-0", "--data", str(shard))
    runs.append(device)
    device.wait_for("waiting for a server")
    status = topics.device_status("dev-0")
    assert getattr(retained(embedded_broker, status), "state", None) == "online"
    device.p.send_signal(signal.SIGTERM)
    assert device.finish(30) == 143
    assert "heron device dev-0: stopped by SIGTERM" in device.text()
    assert "Traceback" not in device.text()
    assert getattr(retained(embedded_broker, status), "state", None) == "offline"


# -- a full disk ------------------------------------------------------------------------------
@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A real 32 MB filesystem for the run directory."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs",
                                            str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("needs root and mount (a small tmpfs)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as fh:
        for size in (1 << 20, 4096):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return filler


def test_a_full_disk_stops_the_run_with_a_clear_error_and_loses_nothing(
        tmp_path: Path, disk: Path, runs: list[Run]) -> None:
    out = disk / "run"
    out.mkdir()
    (tmp_path / "logs").mkdir()
    (out / "logs").symlink_to(tmp_path / "logs")  # the logs stay writable, to be read after
    run = start_run(runs, out)
    run.wait_for(f"round   2/{ROUNDS}")
    filler = fill(disk)
    rc = run.finish(120)
    text = run.text()
    assert rc != 0
    assert "heron run: the server exited with code 1: cannot write " in text
    assert "the disk is full (ENOSPC); the file keeps its previous contents" in text
    done = checkpoint_round(out)
    assert 2 <= done < ROUNDS and records(out) == list(range(1, done + 1))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files

    filler.unlink()
    again = subprocess.run(heron("run", "--resume", str(out)), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    assert records(out) == list(range(1, ROUNDS + 1))
