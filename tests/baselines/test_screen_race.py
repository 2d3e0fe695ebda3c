"""Issue 15 benches: the first-order ceiling screen and the guided-ZO race (progress
--train-set), on a fabricated finished minilm/layer5 run (no federation needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from baselines.progress import ProgressConfig, run_progress
from baselines.race import t_interval
from baselines.screen import ScreenConfig, run_screen
from edge_runtime.protocol import TrainConfig
from exporter.export import export_bundle, flat_from_split
from exporter.zoo import build_split
from heron_data.datasets import load_dataset

SST2 = ROOT.parent / "shared" / "data" / "sst2"
LENGTH = 8


def test_t_interval_matches_the_textbook_values() -> None:
    mean, lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3.0 and lo == pytest.approx(3.0 - half) and hi == pytest.approx(3.0 + half)
    assert math.isnan(t_interval([1.0])[1])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"arms": ("heron", "noise"), "heron_directions": ("random",), "train_set": "lora-last1",
      "aux_from_server": True}, "replays the guided heron arm"),
    ({"heron_directions": ("guided",)}, "need --train-set"),
    ({"arms": ("guide-only",)}, "need --train-set"),
    ({"train_set": "lora-last1"}, "--aux-from-server"),
    ({"train_set": "lnbias-last1", "aux_from_server": True}, "lora-all or lora-lastN"),
    ({"heron_directions": ("sideways",)}, "--heron-directions"),
    ({"train_set": "lora-last1", "aux_from_server": True, "guide_alpha": 1.0}, "alpha"),
])
def test_bad_race_config_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProgressConfig(run_dir="x", **kwargs)  # type: ignore[arg-type]


def test_bad_screen_config_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown screen set"):
        ScreenConfig(run_dir="x", sets=("everything",))


@pytest.fixture(scope="module")
def layer5_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `heron run --model minilm --cut layer5` leaves, from a pretrained split: a
    few SST-2 rows as train, test and dev (the guide pool)."""
    assert (SST2 / "train.tsv").is_file(), f"development data missing: {SST2}"
    root = tmp_path_factory.mktemp("layer5")
    data_dir = root / "data"
    data_dir.mkdir()
    for name, n in (("train", 40), ("test", 24), ("dev", 40)):
        lines = (SST2 / f"{name}.tsv").read_text().splitlines()
        (data_dir / f"{name}.tsv").write_text("\n".join(lines[:n + 1]) + "\n")
    split = build_split("minilm", (2, LENGTH), 2, cut="layer5", seed=0)
    manifest = export_bundle(split, root / "run" / "bundle")
    run = root / "run"
    data = load_dataset("sst2", data_dir, seed=0, max_length=LENGTH)
    (run / "shards").mkdir()
    np.savez(run / "shards" / "dev-0.npz", x=data.x_train, y=data.y_train)
    torch.save({"server_state": split.server.state_dict(),
                "device_weights": torch.from_numpy(flat_from_split(split, manifest)),
                "train_config": TrainConfig(local_steps=2, batch_size=8).to_json()},
               run / "checkpoint.pt")
    (run / "run.json").write_text(json.dumps({"dataset": "sst2", "data_dir": str(data_dir),
                                              "seed": 0, "max_length": LENGTH}))
    return run


@pytest.mark.slow
def test_screen_reports_each_set_with_its_size_and_energy_share(
        layer5_run: Path, tmp_path: Path) -> None:
    report = run_screen(tmp_path, ScreenConfig(
        run_dir=str(layer5_run), steps=2, eval_every=1,
        sets=("lora-last1", "lora-B-last1", "lnbias-last1", "guided-2", "random-2",
              "guided-2-last1", "random-2-last1", "ffnout-last1", "ffnnorm-last1"),
        lrs=(1e-3,), moves=(0.1,), guide_size=16, guide_batch=8, guide_every=1))
    rows = {r["set"]: r for r in report["rows"]}
    # ffnout: ffn_out (1536 -> 384, weight and bias) and ffn_norm (gain, bias); ffnnorm: the gain
    # and bias alone
    assert [rows[s]["d"] for s in rows] == [12_288, 6_144, 4_992, 2, 2, 2, 2,
                                            1536 * 384 + 384 + 2 * 384, 2 * 384]
    for name in ("lora-last1", "lora-B-last1", "guided-2", "random-2", "guided-2-last1",
                 "random-2-last1"):
        assert 0.0 < rows[name]["rho2"] <= 1.0 + 1e-6, name
    # a fresh adapter has B = 0, so dl/dA = 0: all of its gradient energy is in B
    assert rows["lora-B-last1"]["rho2"] == pytest.approx(rows["lora-last1"]["rho2"])
    assert rows["guided-2"]["rho2"] > rows["random-2"]["rho2"]  # 2 of 61,440 directions
    # inside the last layer: never more than that layer's own share
    assert rows["guided-2-last1"]["rho2"] <= rows["lora-last1"]["rho2"] + 1e-6
    assert rows["guided-2-last1"]["rho2"] > rows["random-2-last1"]["rho2"]
    for r in rows.values():
        assert [p["step"] for p in r["runs"][0]["curve"]] == [0, 1, 2]
    table = (tmp_path / "screen.md").read_text()
    assert "| guided-2 | 2 |" in table and json.loads((tmp_path / "screen.json").read_text())
    assert -1.0 <= report["signal"]["cos_shard_test"] <= 1.0 and "cos shard guide" in table


@pytest.mark.slow
def test_race_pairs_the_arms_and_the_noise_control_matches_the_guided_steps(
        layer5_run: Path, tmp_path: Path) -> None:
    cfg = ProgressConfig(
        run_dir=str(layer5_run), steps=2, every=1, aux_from_server=True,
        arms=("heron", "noise", "guide-only", "cse-fsl"),
        heron_directions=("random", "guided"), train_set="lora-last1", guide_size=16,
        guide_rank=2, guide_batch=8, heron_optimizer="sgd", heron_lr=1e-4, seeds=(0, 1),
        fo_steps=1)
    run_progress(tmp_path, cfg)
    for seed in (0, 1):
        report = json.loads((tmp_path / f"seed-{seed}" / "progress.json").read_text())
        curves = report["curves"]
        assert list(curves) == ["heron-random", "heron-guided", "noise", "guide-only",
                                "cse-fsl"]
        for arm, curve in curves.items():  # backprop arms stop at --fo-steps
            steps = [0, 1] if arm in ("guide-only", "cse-fsl") else [0, 1, 2]
            assert [p["step"] for p in curve] == steps, arm
            assert all(p["aux_moved"] == 0.0 for p in curve), arm  # only the set trains
            assert curve[-1]["client_moved"] > 0, arm
        # one step: the same basis and |finite difference|, so the same step length
        assert curves["noise"][1]["client_moved"] == pytest.approx(
            curves["heron-guided"][1]["client_moved"], rel=1e-4)
        assert report["subset"]["basis_bytes_fp16"] == 2 * 12_288 * 2
        table = (tmp_path / f"seed-{seed}" / "progress.md").read_text()
        assert "| 2 |" in table  # the ZO arms' last row, with empty backprop cells
    race = json.loads((tmp_path / "race.json").read_text())["summary"]
    assert race["seeds"] == [0, 1]
    pairs = {(r["a"], r["b"]) for r in race["rows"]}
    assert ("heron-guided", "noise") in pairs and ("cse-fsl", "frozen (step 0)") in pairs
    assert "| heron-guided - guide-only |" in (tmp_path / "race.md").read_text()
