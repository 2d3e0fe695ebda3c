"""The accuracy workload: digits-28 idx files, the report maths, and a tiny bench end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, heron

from baselines.accuracy import (
    CENTRALIZED,
    AccuracyConfig,
    CentralizedSpec,
    aggregate,
    centralized_spec,
    checks,
    make_digits28,
    markdown,
    train_centralized,
)
from heron_data.datasets import load_dataset


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
            "bytes_per_round": [2e6], "cut": "conv1", "model": "cnn"}


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


def test_centralized_row_is_checked_and_reported_without_bytes() -> None:
    runs = [_run("mnist-format", "iid", "heron", s, a) for s, a in enumerate((0.95, 0.96))]
    runs += [{**_run("mnist-format", "iid", CENTRALIZED, s, a), "bytes_total": None,
              "bytes_per_round": None, "device_peak_rss_mb": None,
              "device_step_ms_median": None, "model": "fedcnn"}
             for s, a in enumerate((0.97, 0.98))]
    table = aggregate(runs)
    central = next(r for r in table if r["algorithm"] == CENTRALIZED)
    assert central["mb_total"] is None and central["acc_mean"] == pytest.approx(0.975)
    got = {c["check"]: c for c in checks(table)}["heron vs centralized"]
    assert got["value"] == pytest.approx(-0.02) and not got["met"]
    report = {"config": {**AccuracyConfig().__dict__, "mnist_format_source": "x"},
              "runs": runs, "table": table, "checks": checks(table)}
    text = markdown(report)
    assert "| mnist-format | iid | centralized | 97.50 ± 0.71 (97.00-98.00) |  |  |  |" in text
    assert "heron mean - centralized mean >= -1 point | -2.00 | -1.00 | **no** |" in text


def test_centralized_spec_processes_as_many_samples_as_the_devices() -> None:
    spec = centralized_spec(["--dataset", "mnist", "--data-dir", "D", "--seed", "3",
                             "--devices", "4", "--per-round", "2", "--rounds", "5",
                             "--local-steps", "7", "--batch-size", "16", "--server-lr", "0.01",
                             "--partition", "dirichlet", "--algorithm", "cse-fsl"])
    assert (spec.dataset, spec.data_dir, spec.seed, spec.model) == ("mnist", "D", 3, None)
    assert (spec.steps, spec.steps_per_round, spec.batch_size) == (2 * 5 * 7, 2 * 7, 16)
    assert (spec.optimizer, spec.lr) == ("adam", 0.01)
    default = centralized_spec([])  # `heron run`'s defaults: 3 devices x 20 rounds x 40 steps
    assert (default.steps, default.batch_size, default.lr) == (3 * 20 * 40, 32, 1e-3)


def test_centralized_training_learns_and_is_seeded() -> None:
    spec = CentralizedSpec(dataset="digits", data_dir=None, seed=0, model=None, cut=None,
                           steps=60, steps_per_round=20, batch_size=32, optimizer="adam",
                           lr=3e-3)
    first, again = train_centralized(spec), train_centralized(spec)
    assert first["model"] == "cnn" and first["cut"] == "conv1"  # 8x8 digits: the zoo's cnn
    assert len(first["test_accuracy_per_round"]) == 3
    assert first["samples"] == 60 * 32
    assert first["final_test_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert first["test_accuracy_per_round"] == again["test_accuracy_per_round"]


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
