"""Result files on a full disk: a clear error naming the file, and the previous file intact.

The real cases run on a small tmpfs (needs root and mount); the same paths are also forced
with a patched os.write / os.fsync so they are checked on any machine."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.records import (
    WriteError,
    append_jsonl,
    atomic_write_bytes,
    round_line,
    save_checkpoint,
    write_json,
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 kB filesystem."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                                            str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("needs root and mount (a small tmpfs)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses more; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_a_full_disk_keeps_the_previous_checkpoint(small_disk: Path) -> None:
    path = small_disk / "checkpoint.pt"
    save_checkpoint(path, {"round": 1, "w": torch.zeros(100)})
    fill(small_disk)
    with pytest.raises(WriteError) as caught:
        save_checkpoint(path, {"round": 2, "w": torch.zeros(10_000)})
    assert str(caught.value).startswith(f"cannot write {path}: the disk is full (ENOSPC); "
                                        "the file keeps its previous contents")
    assert caught.value.errno == errno.ENOSPC
    assert torch.load(path, weights_only=True)["round"] == 1
    assert _files(small_disk) == ["checkpoint.pt", "filler"]  # no temp file left behind


def test_a_full_disk_keeps_the_previous_summary(small_disk: Path) -> None:
    path = small_disk / "summary.json"
    write_json(path, {"rounds": 1})
    fill(small_disk)
    with pytest.raises(WriteError, match="the disk is full"):
        write_json(path, {"rounds": 2, "pad": "x" * 20_000})
    assert json.loads(path.read_text()) == {"rounds": 1}
    assert _files(small_disk) == ["filler", "summary.json"]


def test_a_full_disk_never_leaves_half_a_metrics_line(small_disk: Path) -> None:
    path = small_disk / "metrics.jsonl"
    for r in (1, 2):
        append_jsonl(path, {"round": r})
    before = path.read_bytes()
    fill(small_disk)
    # a line longer than a page: the first write fills the file's last page, the next fails
    with pytest.raises(WriteError) as caught:
        append_jsonl(path, {"round": 3, "pad": "x" * 20_000})
    assert f"cannot write {path}: the disk is full (ENOSPC)" in str(caught.value)
    assert path.read_bytes() == before


def test_the_space_comes_back_and_writing_goes_on(small_disk: Path) -> None:
    path = small_disk / "metrics.jsonl"
    filler = fill(small_disk)
    with pytest.raises(WriteError):
        append_jsonl(path, {"round": 1, "pad": "x" * 20_000})
    filler.unlink()
    append_jsonl(path, {"round": 1})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"round": 1}]


# -- the same failures, forced (any machine) -------------------------------------------------
def _enospc(*args: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_fsync_keeps_the_previous_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "summary.json"
    write_json(path, {"rounds": 1})
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(WriteError, match=r"summary.json: the disk is full \(ENOSPC\)"):
        write_json(path, {"rounds": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"rounds": 1}
    assert _files(tmp_path) == ["summary.json"]


def test_a_short_write_then_enospc_is_cut_back(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"round": 1})
    before = path.read_bytes()
    real_write = os.write
    calls: list[int] = []

    def short_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:5]))  # part of the line reaches the file
        return _enospc()

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(WriteError, match="the disk is full"):
        append_jsonl(path, {"round": 2})
    monkeypatch.undo()
    assert len(calls) == 2 and path.read_bytes() == before


def test_other_write_errors_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: object) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "fsync", read_only)
    with pytest.raises(WriteError, match=r"Read-only file system \(EROFS\)"):
        atomic_write_bytes(tmp_path / "x", b"1")


def test_a_round_line_says_accuracy_devices_traffic_and_time() -> None:
    rec = {"round": 3, "test_accuracy": 0.91234, "test_loss": 0.3, "updates": ["a", "b"],
           "participants": ["a", "b", "c"], "bytes_up": 2_500_000, "bytes_down": 1_000_000,
           "device_peak_rss_mb": {"a": 80.0, "b": None}, "device_step_ms": {"a": 2.0, "b": 4.0},
           "round_seconds": 1.25}
    line = round_line(rec, 20)
    assert line.startswith("round   3/20  test acc 0.9123  test loss 0.3000  devices 2/3")
    assert "up 2.50 MB  down 1.00 MB  device peak RSS 80 MB  step 3.00 ms  1.2 s" in line
    rec["device_peak_rss_mb"], rec["device_step_ms"] = {}, {}
    assert "RSS nan MB  step nan ms" in round_line(rec, 20)  # no telemetry came in


def test_a_round_without_evaluation_says_so_and_one_with_a_subset_says_how_many() -> None:
    rec = {"round": 1, "test_accuracy": None, "test_loss": None, "test_examples": None,
           "updates": ["a"], "participants": ["a"], "bytes_up": 0, "bytes_down": 0,
           "device_peak_rss_mb": {}, "device_step_ms": {}, "round_seconds": 1.0}
    assert round_line(rec, 5).startswith("round   1/5  not evaluated (--eval-every)  devices")
    rec.update(test_accuracy=0.5, test_loss=1.0, test_examples=500)
    assert "test acc 0.5000  test loss 1.0000 (n=500)  devices 1/1" in round_line(rec, 5)
