"""`heron bench --workload fleet` on a tiny sweep: the row fields fleet.json promises."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, heron, mosquitto_binary

from baselines.fleet import parse_devices
from baselines.fleet_probes import _thread_states, thread_summary


@pytest.mark.broker
@pytest.mark.slow
def test_fleet_workload_writes_a_row_per_size(tmp_path: Path) -> None:
    mosquitto_binary()  # skips without mosquitto
    res = subprocess.run(
        heron("bench", "--workload", "fleet", "--devices", "3,5", "--rounds", "1",
              "--local-steps", "4", "--per-host", "3", "--out", str(tmp_path / "b")),
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "b" / "fleet.json").read_text())
    assert [r["devices"] for r in report["rows"]] == [3, 5]
    for row in report["rows"]:
        for key in ("devices", "round_seconds_median", "updates_expected", "updates_received",
                    "server_main_thread_busy", "server_waiting_share", "cores_busy",
                    "broker_msgs_in_per_s", "broker_bytes_out_per_s", "cpu_seconds",
                    "server_peak_rss_mb", "broker_peak_rss_mb", "host_peak_rss_mb",
                    "host_threads", "error"):
            assert key in row, key
        # main, 3 device loops at most, one MQTT network thread (the shared loop) and one
        # more seen (6 measured); a paho loop_start thread per device would make it 9
        assert row["host_threads"]["threads_max"] <= 1 + 3 + 1 + 1
        assert row["updates_received"] == row["updates_expected"] == row["devices"]
        assert row["error"] is None
    assert [r["hosts"] for r in report["rows"]] == [1, 2]  # --per-host 3: 5 devices, 2 hosts
    assert (tmp_path / "b" / "fleet.png").stat().st_size > 0
    assert "| 5 |" in (tmp_path / "b" / "fleet.md").read_text()
    assert "heron bench fleet: 3 devices" in res.stdout  # progress while it runs


def test_devices_list_is_checked() -> None:
    assert parse_devices("10,100") == (10, 100)
    with pytest.raises(ValueError, match="10,100,300,1000"):
        parse_devices("10,x")


def test_thread_states_counts_this_process_threads_and_sees_itself_running() -> None:
    import os
    import threading

    stop = threading.Event()
    idle = [threading.Thread(target=stop.wait) for _ in range(3)]
    for t in idle:
        t.start()
    try:
        got = _thread_states(os.getpid())
        assert got is not None
        threads, running = got
        assert threads == len(os.listdir(f"/proc/{os.getpid()}/task"))
        assert threads >= 4  # this one and the three waiting
        assert 1 <= running <= threads - 3  # the reader runs; the three waiters sleep
    finally:
        stop.set()


def test_thread_summary_keeps_to_the_rounds_window() -> None:
    samples = [(0.0, 9.0, {"hosts": [(500, 160)]}),  # before the rounds: left out
               (1.0, 2.0, {"hosts": [(260, 1), (255, 3)]}),
               (2.0, 3.0, {"hosts": [(260, 2), (255, 2)]})]
    s = thread_summary(samples, "hosts", 0.5, 2.5)
    assert s == {"load_1min_max": 3.0, "threads_max": 260, "runnable_max": 3,
                 "runnable_mean": 2.0}
