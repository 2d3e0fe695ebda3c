"""The accuracy workload: digits-28 idx files, the report maths, and a tiny bench end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, heron

from baselines.accuracy import AccuracyConfig, aggregate, checks, make_digits28, markdown
from devices.datasets import load_dataset


def test_digits28_is_read_by_the_mnist_loader(tmp_path: Path) -> None:
    root = make_digits28(tmp_path / "d28", seed=1)
    ds = load_dataset("mnist", str(root), seed=0)
    assert ds.input_shape == (1, 28, 28)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert set(np.unique(ds.y_train)) == set(range(10))
    # the digit sits somewhere inside the canvas, with empty margins around it
    raw = (root / "train-images-idx3-ubyte").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert ds.x_train.std() > 0


def _run(ds: str, part: str, alg: str, seed: int, acc: float) -> dict:
    return {"dataset": ds, "partition": part, "algorithm": alg, "seed": seed,
            "final_test_accuracy": acc, "bytes_total": 2e6, "device_peak_rss_mb": 80.0,
            "device_step_ms_median": 1.0, "test_accuracy_per_round": [acc],
            "bytes_per_round": [2e6], "cut": "conv1"}


def test_aggregate_and_checks() -> None:
    runs = [_run("digits", "iid", "heron", s, a) for s, a in enumerate((0.90, 0.92, 0.94))]
    runs += [_run("digits", "iid", "cse-fsl", s, a) for s, a in enumerate((0.93, 0.93, 0.93))]
    runs += [_run("digits", "iid", "frozen", s, a) for s, a in enumerate((0.80, 0.81, 0.79))]
    table = aggregate(runs)
    heron_row = next(r for r in table if r["algorithm"] == "heron")
    assert heron_row["acc_mean"] == pytest.approx(0.92)
    assert heron_row["acc_std"] == pytest.approx(0.02)
    assert (heron_row["acc_min"], heron_row["acc_max"]) == (0.90, 0.94)
    got = {c["check"]: c for c in checks(table)}
    assert got["heron vs cse-fsl"]["met"] and got["heron vs cse-fsl"]["value"] == \
        pytest.approx(-0.01)
    assert got["heron vs frozen"]["met"]
    runs[-1]["final_test_accuracy"] = 0.93  # frozen catches up: the target fails
    assert not {c["check"]: c for c in checks(aggregate(runs))}["heron vs frozen"]["met"]
    report = {"config": {**AccuracyConfig().__dict__, "mnist_format_source": "x"},
              "runs": runs, "table": table, "checks": checks(table)}
    text = markdown(report)
    assert "| digits | iid | **heron** | 92.00 ± 2.00 (90.00-94.00)" in text


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="algorithms"):
        AccuracyConfig(algorithms=("heron", "magic"))
    with pytest.raises(ValueError, match="datasets"):
        AccuracyConfig(datasets=("imagenet",))


@pytest.mark.broker
@pytest.mark.slow
def test_accuracy_bench_end_to_end_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = heron("bench", "--workload", "accuracy", "--out", str(out),
                 "--datasets", "digits,mnist-format", "--partitions", "dirichlet",
                 "--algorithms", "heron,sflv2", "--seeds", "0", "--devices", "2",
                 "--rounds", "2", "--local-steps", "4")
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    report = json.loads((out / "accuracy.json").read_text())
    assert len(report["runs"]) == 4
    assert {(r["dataset"], r["algorithm"]) for r in report["runs"]} == {
        ("digits", "heron"), ("digits", "sflv2"), ("mnist-format", "heron"),
        ("mnist-format", "sflv2")}
    assert all(len(r["test_accuracy_per_round"]) == 2 for r in report["runs"])
    assert (out / "accuracy.md").read_text().count("| dirichlet |") >= 4
    assert (out / "accuracy_rounds.png").stat().st_size > 0
    assert (out / "accuracy_bytes.png").stat().st_size > 0
    # a second start reuses the finished federations
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reused") == 4, again.stdout
