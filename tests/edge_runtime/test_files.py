"""The one atomic-write helper: old file or new file, never half of one, never a stray temp."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from edge_runtime.files import atomic_write


def test_a_write_replaces_the_file_with_the_mode_asked(tmp_path: Path) -> None:
    path = tmp_path / "secret.json"
    atomic_write(path, b"old")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # mkstemp's, when no mode is given
    atomic_write(path, b"new", 0o640)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["secret.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]
