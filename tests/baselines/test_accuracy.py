"""The accuracy workload: its config, and a tiny bench end to end (digits-28, the centralized
reference and the report have their own test files)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, heron

from baselines.accuracy import AccuracyConfig
from baselines.centralized import CENTRALIZED


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="algorithms"):
        AccuracyConfig(algorithms=("heron", "magic"))
    with pytest.raises(ValueError, match="datasets"):
        AccuracyConfig(datasets=("imagenet",))
    assert CENTRALIZED in AccuracyConfig().algorithms


@pytest.mark.broker
@pytest.mark.slow
def test_accuracy_bench_end_to_end_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = heron("bench", "--workload", "accuracy", "--out", str(out),
                 "--datasets", "digits,mnist-format", "--partitions", "dirichlet",
                 "--algorithms", "heron,sflv2,centralized", "--seeds", "0", "--devices", "2",
                 "--rounds", "2", "--local-steps", "4")
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    report = json.loads((out / "accuracy.json").read_text())
    assert len(report["runs"]) == 6
    assert {(r["dataset"], r["algorithm"], r["model"]) for r in report["runs"]} == {
        ("digits", "heron", "cnn"), ("digits", "sflv2", "cnn"), ("digits", "centralized", "cnn"),
        ("mnist-format", "heron", "fedcnn"), ("mnist-format", "sflv2", "fedcnn"),
        ("mnist-format", "centralized", "fedcnn")}  # each data set's default model
    assert all(len(r["test_accuracy_per_round"]) == 2 for r in report["runs"])
    assert {c["check"] for c in report["checks"]} == {"heron vs centralized"}
    assert (out / "accuracy.md").read_text().count("| dirichlet |") >= 4
    assert (out / "accuracy_rounds.png").stat().st_size > 0
    assert (out / "accuracy_bytes.png").stat().st_size > 0
    # a second start reuses the finished federations
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reused") == 6, again.stdout


@pytest.mark.broker
@pytest.mark.slow
def test_cifar_format_runs_on_generated_cifar10_batches(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = heron("bench", "--workload", "accuracy", "--out", str(out),
                 "--datasets", "cifar-format", "--model", "cnn", "--partitions", "iid",
                 "--algorithms", "frozen", "--seeds", "0", "--devices", "2", "--rounds", "1",
                 "--local-steps", "2")
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    report = json.loads((out / "accuracy.json").read_text())
    [run] = report["runs"]
    assert (run["dataset"], run["model"]) == ("cifar-format", "cnn")
    assert (out / "data" / "digits32c" / "test_batch").is_file()  # what the run read
    argv_used = json.loads((out / run["run_dir"] / "bench-argv.json").read_text())
    assert argv_used[argv_used.index("--dataset") + 1] == "cifar10"
    assert "digits-32c" in report["config"]["cifar_format_source"]
    assert "cifar-format = digits-32c" in (out / "accuracy.md").read_text()
