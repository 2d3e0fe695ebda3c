"""Server options that are refused before any broker is contacted: a clear error, exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, heron


@pytest.mark.parametrize(("extra", "message"), [
    ((), "no aux parameter of cnn has a server parameter"),  # a CNN's fc aux matches nothing
    (("--algorithm", "sflv2"), "applies to heron, cse-fsl, frozen"),
])
def test_aux_from_server_is_refused_where_it_cannot_apply(tmp_path: Path, extra: tuple[str, ...],
                                                          message: str) -> None:
    proc = subprocess.run(heron("server", "--broker", "mqtt://127.0.0.1:1", "--out",
                                str(tmp_path), "--aux-from-server", *extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
