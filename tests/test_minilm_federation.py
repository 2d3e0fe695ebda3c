"""Issue 4 end to end: MiniLM split with LoRA, ZO-trained on devices, on a slice of SST-2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, heron

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SST2 = ROOT.parent / "shared" / "data" / "sst2"


def test_minilm_heron_federation_on_an_sst2_slice_beats_chance(tmp_path: Path) -> None:
    assert (SST2 / "train.tsv").is_file(), f"development data missing: {SST2}"
    out = tmp_path / "run"
    proc = subprocess.run(
        heron("run", "--model", "minilm", "--dataset", "sst2", "--limit", "300",
              "--max-length", "32", "--rounds", "3", "--devices", "2", "--local-steps", "10",
              "--batch-size", "16", "--out", str(out)),
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "minilm" and summary["cut"] == "layer3"
    assert summary["device_params"] == 49_922  # LoRA q/v on 3 layers + aux LoRA + classifier
    # 300 held-out SST-2 sentences, balanced-ish: chance is about 0.5
    assert summary["final_test_accuracy"] > 0.6, summary["test_accuracy_per_round"]
    shard = np.load(out / "shards" / "dev-0.npz")
    assert shard["x"].dtype == np.int64 and shard["x"].shape[1:] == (2, 32)
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["input"]["dtype"] == "int64"
