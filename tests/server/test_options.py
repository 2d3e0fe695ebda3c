"""Server options that are refused before any broker is contacted: a clear error, exit 2."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, heron


@pytest.mark.parametrize(("extra", "message"), [
    ((), "no aux parameter of cnn has a server parameter"),  # a CNN's fc aux matches nothing
    (("--algorithm", "sflv2"), "applies to heron, heron-tail, cse-fsl, frozen"),
])
def test_aux_from_server_is_refused_where_it_cannot_apply(tmp_path: Path, extra: tuple[str, ...],
                                                          message: str) -> None:
    proc = subprocess.run(heron("server", "--broker", "mqtt://127.0.0.1:1", "--out",
                                str(tmp_path), "--aux-from-server", *extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize(("extra", "message"), [
    (("--trim", "0.5"), "argument --trim: the fraction cut at each end must be in [0, 0.5)"),
    (("--trim", "nan"), "argument --trim: the fraction cut at each end must be in [0, 0.5)"),
    (("--clip-update-norm", "0"), "argument --clip-update-norm: must be a finite number > 0"),
    (("--max-update-norm", "-1"), "argument --max-update-norm: must be a finite number > 0"),
    (("--quarantine-after", "-1"), "argument --quarantine-after: must be >= 0"),
])
def test_bad_robustness_options_are_refused(tmp_path: Path, extra: tuple[str, ...],
                                            message: str) -> None:
    proc = subprocess.run(heron("server", "--broker", "mqtt://127.0.0.1:1", "--out",
                                str(tmp_path), *extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_heron_run_forwards_the_robustness_options_to_its_server(tmp_path: Path) -> None:
    from heron.cli import parse_args
    from heron.cli.config import config_text
    from heron.cli.run import server_args

    def handed(*run_argv: str) -> argparse.Namespace:
        """What the server reads from the config file `heron run RUN_ARGV` hands it."""
        path = tmp_path / "server.toml"
        path.write_text(config_text(server_args(parse_args(["run", *run_argv]), "mqtt://x",
                                                Path("o")), "server"))
        return parse_args(["server", "--config", str(path)])

    server = handed("--aggregate", "trimmed-mean", "--trim", "0.3", "--clip-update-norm", "2.5",
                    "--max-update-norm", "9", "--quarantine-after", "4")
    for name, value in (("aggregate", "trimmed-mean"), ("trim", 0.3),
                        ("clip_update_norm", 2.5), ("max_update_norm", 9.0),
                        ("quarantine_after", 4)):
        assert getattr(server, name) == value, name
    defaults = handed()
    assert (defaults.aggregate, defaults.trim, defaults.quarantine_after) == ("mean", 0.2, 10)
