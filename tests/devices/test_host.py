"""`heron devices host`: many devices in one process, each with its own MQTT client."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, heron

from devices.host import SharedModelDevice, raise_open_files


@pytest.mark.broker
@pytest.mark.slow
def test_three_devices_in_one_process_complete_a_federation(tmp_path: Path,
                                                             mosquitto: str) -> None:
    shards = tmp_path / "shards"
    subprocess.run(heron("devices", "partition", "--devices", "3", "--out", str(shards)),
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    server = subprocess.Popen(
        heron("server", "--broker", mosquitto, "--out", str(tmp_path / "run"), "--devices", "3",
              "--rounds", "2", "--local-steps", "4", "--model", "cnn", "--join-timeout", "120",
              "--round-timeout", "120"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    host = subprocess.run(
        heron("devices", "host", "--broker", mosquitto, "--shards", str(shards),
              "--bundle-cache", str(tmp_path / "bundles")),
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    out, _ = server.communicate(timeout=60)
    assert server.returncode == 0, out
    assert host.returncode == 0, host.stdout + host.stderr
    assert "3 devices (dev-0 .. dev-2) in this process" in host.stdout
    assert "3/3 devices ended cleanly" in host.stdout
    recs = [json.loads(line) for line in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["updates"]) for r in recs] == [["dev-0", "dev-1", "dev-2"]] * 2
    # each kept its own client: three connections, each announced under its own id
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(summary["device_profiles"]) == ["dev-0", "dev-1", "dev-2"]


def test_hosted_devices_share_one_session_and_skip_the_process_memory_check() -> None:
    # the dry-run memory check measures the whole process, i.e. the host, not one device
    assert SharedModelDevice.checks_memory is False


def test_open_file_limit_is_raised_up_to_the_hard_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        got = raise_open_files(soft + 1 if hard == resource.RLIM_INFINITY or soft < hard
                               else soft)
        assert got >= soft
        assert hard == resource.RLIM_INFINITY or got <= hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
