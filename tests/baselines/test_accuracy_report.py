"""The accuracy report: aggregation over seeds, the issue's checks, the markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baselines.accuracy import AccuracyConfig
from baselines.accuracy_report import (
    aggregate,
    checks,
    default_pairs,
    main,
    markdown,
    pair_benches,
    paired,
)
from baselines.centralized import CENTRALIZED


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


def test_paired_differences_pair_by_seed_with_a_t_interval() -> None:
    runs = [_run("digits", "iid", "heron", s, a) for s, a in enumerate((0.90, 0.92, 0.94))]
    runs += [_run("digits", "iid", "frozen", s, a) for s, a in enumerate((0.89, 0.90, 0.91))]
    runs += [_run("digits", "iid", "cse-fsl", 0, 0.95)]  # one seed: no interval, no row
    runs += [_run("digits", "iid", "frozen", 7, 0.50)]  # no heron seed 7: left out
    rows = paired(runs)
    assert [(r["a"], r["b"]) for r in rows] == [("heron", "frozen")]
    got = rows[0]
    assert got["seeds"] == [0, 1, 2] and got["diffs"] == pytest.approx([0.01, 0.02, 0.03])
    # mean 0.02, sd 0.01, t(0.975, 2 df) = 4.303: half-width 4.303 * 0.01 / sqrt(3)
    half = 4.303 * 0.01 / 3 ** 0.5
    assert got["mean"] == pytest.approx(0.02)
    assert got["ci95"] == pytest.approx([0.02 - half, 0.02 + half])
    assert not got["excludes_0"]  # 0.02 - 0.0248 < 0
    shifted = [{**r, "final_test_accuracy": r["final_test_accuracy"] + 0.05}
               if r["algorithm"] == "heron" else r for r in runs]
    assert paired(shifted)[0]["excludes_0"]  # the same spread around +7 points
    # tail: the mean of the last rounds, here (0.5, acc) per run: half the final difference
    halved = [{**r, "test_accuracy_per_round": [0.5, r["final_test_accuracy"]]} for r in runs]
    tail = paired(halved, tail=2)[0]
    assert tail["tail"] == 2 and tail["diffs"] == pytest.approx([0.005, 0.01, 0.015])
    report = {"config": {**AccuracyConfig().__dict__, "mnist_format_source": "x"},
              "runs": runs, "table": aggregate(runs), "checks": [], "paired": rows}
    assert "Paired per-seed differences of the final test accuracy:" in markdown(report)
    assert ("| digits | iid | heron - frozen | +1.00, +2.00, +3.00 | +2.00 | [-0.48, +4.48] | "
            "no |") in markdown(report)


def test_every_non_control_algorithm_is_paired_against_the_controls() -> None:
    runs = [_run("sst2", "iid", alg, s, a) for s in range(2)
            for alg, a in (("heron-tail", 0.77), ("frozen", 0.76), ("cse-fsl", 0.80))]
    got = {(r["a"], r["b"]): r["mean"] for r in paired(runs)}
    assert got == pytest.approx({("cse-fsl", "frozen"): 0.04, ("heron-tail", "frozen"): 0.01,
                                 ("heron-tail", "cse-fsl"): -0.03})
    assert default_pairs(["heron", "frozen", "heron", "heron-tail"]) == [
        ("cse-fsl", "frozen"), ("heron", "frozen"), ("heron", "cse-fsl"),
        ("heron", CENTRALIZED), ("heron-tail", "frozen"), ("heron-tail", "cse-fsl"),
        ("heron-tail", CENTRALIZED), ("cse-fsl", CENTRALIZED)]


def test_two_benches_are_paired_by_seed_per_algorithm(tmp_path: Path) -> None:
    a = {"runs": [_run("digits", "iid", "heron", s, v) for s, v in
                  ((0, 0.90), (1, 0.80), (2, 0.85))], "command": "heron bench ... int8"}
    b = {"runs": [_run("digits", "iid", "heron", s, v) for s, v in
                  ((0, 0.88), (1, 0.81), (2, 0.80), (3, 0.5))]}
    got = pair_benches(a, b, "int8", "fp32")
    [row] = got["paired"]
    assert (row["a"], row["b"], row["seeds"]) == ("heron int8", "heron fp32", [0, 1, 2])
    assert row["diffs"] == pytest.approx([0.02, -0.01, 0.05])  # seed 3 has no partner
    # the CLI writes the pairing and its tables
    for name, bench in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "accuracy.json").write_text(json.dumps(bench))
    main(["pair", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "int8,fp32",
          "--out", str(tmp_path / "paired")])
    assert json.loads((tmp_path / "paired.json").read_text())["paired"][0]["seeds"] == [0, 1, 2]
    assert "heron int8 - heron fp32" in (tmp_path / "paired.md").read_text()
