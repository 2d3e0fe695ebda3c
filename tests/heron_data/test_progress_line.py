"""The throttled progress line and the long commands that print it (partition, pack)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from heron_data.progress import throttled


def test_progress_prints_at_most_one_line_per_interval() -> None:
    now = [0.0]
    lines: list[str] = []
    report = throttled("eval", "examples", every_s=5.0, clock=lambda: now[0], out=lines.append)
    for done, t in ((100, 1.0), (200, 5.5), (300, 7.0), (400, 11.0), (500, 20.0)):
        now[0] = t
        report(done, 500)  # the last call is the end: no line for it
    assert lines == ["eval: 200/500 examples (6 s)", "eval: 400/500 examples (11 s)"]


def test_writing_shards_reports_each_one(tmp_path: Path) -> None:
    from heron_data.partition import write_shards

    calls: list[tuple[int, int]] = []
    x, y = np.zeros((6, 2), np.float32), np.arange(6) % 2
    write_shards(x, y, [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])], tmp_path,
                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_pack_says_pip_is_still_running(capsys: pytest.CaptureFixture[str]) -> None:
    from devices.pack import PackError, _run

    proc = _run([sys.executable, "-c", "import time; time.sleep(0.5); print('done')"],
                "downloading", every_s=0.1)
    assert proc.returncode == 0 and proc.stdout == "done\n"
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(ln.startswith("heron devices pack: downloading (") for ln in lines)
    with pytest.raises(PackError, match="took more than 0 minutes"):
        _run([sys.executable, "-c", "import time; time.sleep(30)"], "downloading",
             limit_s=0.2, every_s=0.1)
