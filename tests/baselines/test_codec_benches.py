"""The codec benches' own arithmetic: bytes per round without the bundle, and the
server-only pairing (BENCHMARKS.md, "Smashed-data codecs")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baselines.codec_bytes import markdown, round_bytes
from baselines.generated_data import make_digits28
from baselines.smashed_codec import server_only


def test_round_bytes_leave_out_the_bundle_and_add_both_directions(tmp_path: Path) -> None:
    up = {"smashed": 1000, "grad": 0, "weights": 40, "weights_fallback": 0, "bundle": 5000,
          "control": 2}
    down = {"smashed": 0, "grad": 0, "weights": 40, "weights_fallback": 0, "bundle": 7000,
            "control": 3}
    later = {**up, "bundle": 0, "smashed": 999}
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"bytes_up_by_kind": up, "bytes_down_by_kind": down},
        {"bytes_up_by_kind": later, "bytes_down_by_kind": down})) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps(
        {"device_params": 10, "model": "cnn", "cut": "conv1"}))
    got = round_bytes(tmp_path)
    assert got["total"] == 1000 + 40 + 2 + 40 + 3  # round 1's, the bundle left out
    assert "bundle" not in got["up"] and "bundle" not in got["down"]
    row = {"workload": "digits", "setting": "int8", "bytes": got, "ratio": 0.25}
    assert "| digits (cnn/conv1) | 10 | int8 | 0.001 MB |" in markdown([row])


@pytest.mark.slow
def test_server_only_pairs_each_codec_with_fp32_on_the_same_batches(tmp_path: Path) -> None:
    data = make_digits28(tmp_path / "d28")
    got = server_only(data, steps=3, seeds=2, codecs=("fp32", "int8"), batch=8)
    assert set(got["accuracy"]) == {"fp32", "int8"}
    # a seed's batches and initialisation do not depend on what else ran: fp32 alone again
    # trains the same server (one torch thread, the same ops in the same order)
    again = server_only(data, steps=3, seeds=2, codecs=("fp32",), batch=8)
    assert again["accuracy"]["fp32"] == got["accuracy"]["fp32"] and again["paired"] == {}
    assert all(0.0 <= a <= 1.0 for accs in got["accuracy"].values() for a in accs)
    [(name, p)] = got["paired"].items()
    assert name == "int8 - fp32" and len(p["diffs"]) == 2
    lo, hi = p["ci95"]
    assert lo <= p["mean"] <= hi


def test_the_codec_profile_pairs_every_setting_with_fp32_inline() -> None:
    """Real `heron profile` children on the digits bundle: each setting's ratios are taken
    against the baseline of the same repeat, so the baseline's own are exactly 1."""
    from baselines.smashed_codec import WORKLOADS, profile_workload
    from baselines.smashed_codec import markdown as profile_markdown

    settings = (("fp32", "inline"), ("int8", "thread"))
    res = profile_workload(WORKLOADS["digits"], repeats=2, steps=4, warmup=0,
                           settings=settings, progress=lambda line: None)
    base, int8 = res["rows"]
    assert res["baseline"] == {"codec": "fp32", "uplink": "inline"}
    for m in ("step_ms_pair", "step_ms_mean", "step_cpu_ms_mean", "peak_rss_mb"):
        assert base[f"{m}_ratio"]["per_repeat"] == [1.0, 1.0]
        assert len(int8[f"{m}_ratio"]["per_repeat"]) == 2 and int8[m] > 0
    # int8 sends a quarter of the values' bytes, plus one scale and offset per channel
    assert int8["smashed_bytes"] < 0.3 * base["smashed_bytes"]
    table = profile_markdown([res])
    assert "| digits cnn/conv1 | fp32 | inline |" in table and "| int8 | thread |" in table


def test_the_interleaved_profile_pairs_blocks_by_round() -> None:
    """One torch-free child runs every setting's blocks in shuffled order; the baseline's
    ratio to itself is exactly 1 and every other setting has a finite interval around its
    ratio of medians."""
    import numpy as np

    from baselines.smashed_codec import WORKLOADS, interleave_markdown, interleave_workload

    settings = (("fp32", "inline"), ("int8", "thread"))
    res = interleave_workload(WORKLOADS["digits"], rounds=4, warmup=1, settings=settings)
    wall = np.asarray(res["wall_ms"])
    assert wall.shape == (4, 2) and np.all(wall > 0) and res["steps_per_block"] == 4
    base, int8 = res["rows"]
    assert base["step_ratio"] == {"ratio": 1.0, "lo": 1.0, "hi": 1.0}
    r = int8["step_ratio"]
    assert 0 < r["lo"] <= r["hi"] and r["ratio"] == pytest.approx(
        np.median(wall[:, 1]) / np.median(wall[:, 0]))
    assert "| digits cnn/conv1 | int8 | thread |" in interleave_markdown([res])
