"""`heron bench --workload progress` on a real finished federation (cnn on digits)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, heron

from baselines.progress import ProgressConfig, run_progress

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run(heron("run", "--devices", "2", "--rounds", "2", "--local-steps", "4",
                                "--out", str(out)),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_progress_starts_at_the_servers_final_evaluation_and_trains_both_arms(
        finished_run: Path, tmp_path: Path) -> None:
    proc = subprocess.run(heron("bench", "--workload", "progress", "--from", str(finished_run),
                                "--steps", "8", "--every", "4", "--out", str(tmp_path)),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "progress.json").read_text())
    last = json.loads((finished_run / "metrics.jsonl").read_text().splitlines()[-1])
    for arm in ("heron", "cse-fsl"):
        curve = report["curves"][arm]
        assert [p["step"] for p in curve] == [0, 4, 8]
        # step 0 is the federation's final model, evaluated as the server evaluated it
        assert curve[0]["test_accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-9)
        assert curve[0]["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5)
        assert curve[-1]["aux_test_loss"] != curve[0]["aux_test_loss"]  # the device trained
        assert curve[0]["client_moved"] == curve[0]["aux_moved"] == 0.0
        assert curve[-1]["client_moved"] > 0 and curve[-1]["aux_moved"] > 0
    assert "| 8 |" in (tmp_path / "progress.md").read_text()
    assert "| 8 |" in proc.stdout


def test_progress_refuses_what_it_cannot_run(finished_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a finished federation"):
        run_progress(tmp_path, ProgressConfig(run_dir=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="no aux tensor of cnn"):
        run_progress(tmp_path, ProgressConfig(run_dir=str(finished_run), aux_from_server=True))
    with pytest.raises(ValueError, match="--device names one of"):
        run_progress(tmp_path, ProgressConfig(run_dir=str(finished_run), device="dev-9"))
    report = run_progress(tmp_path / "q", ProgressConfig(
        run_dir=str(finished_run), steps=2, every=2, arms=("heron",), heron_q=3, heron_mu=0.01,
        heron_optimizer="sgd", heron_lr=1e-4))
    assert report["heron_config"]["zo"]["q"] == 3 and report["heron_config"]["zo"]["mu"] == 0.01
    assert report["heron_config"]["optimizer"] == {**report["heron_config"]["optimizer"],
                                                  "name": "sgd", "lr": 1e-4}
    assert "heron: sgd lr 0.0001, mu 0.01, q 3" in (tmp_path / "q" / "progress.md").read_text()
    broken = tmp_path / "broken"
    for name in ("bundle", "shards"):
        (broken / name).mkdir(parents=True)
    (broken / "run.json").write_text("{}")
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*checkpoint.pt"):
        run_progress(tmp_path, ProgressConfig(run_dir=str(broken)))
    with pytest.raises(ValueError, match="arms"):
        ProgressConfig(run_dir="x", arms=("sflv2",))
