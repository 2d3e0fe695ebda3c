"""`heron profile` and `heron bench --workload cost` on a tiny configuration (cnn on 1x8x8,
batch 8, 2 steps): every algorithm reports every field, the ONNX Runtime algorithms run in
a process without torch, FLOPs agree with torch's counter, the files get written (the counts
themselves: test_counts.py).

No timing is compared here: these are measurements, checked for shape and sanity only.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT, heron
from torch.utils.flop_counter import FlopCounterMode

from baselines.bench import run_cost
from baselines.counts import onnx_graph_flops
from baselines.steps import ALGORITHMS, ONNX_ALGORITHMS
from exporter.export import export_split, train_graph
from exporter.zoo import build_split

TINY = {"model": "cnn", "batch": 8, "input_shape": (1, 8, 8), "num_classes": 10}
FIELDS = {
    "algorithm": str, "model": str, "cut": str, "batch": int, "threads": int,
    "step_ms_median": float, "step_ms_min": float, "step_ms_max": float,
    "forward_ms_median": float, "forwards_per_step": int, "step_over_forwards": float,
    "peak_rss_mb": float, "flops_per_step": int, "flops_method": str,
    "bytes_per_step": int, "bytes_per_round": int, "bytes_up_per_round": int,
    "bytes_down_per_round": int, "versions": dict, "torch_imported": bool,
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    report = run_cost(out, steps=2, warmup=1, threads=1, progress=lambda _: None, **TINY)
    return out, report


def test_bench_profiles_every_algorithm_with_all_fields(
        bench: tuple[Path, dict[str, Any]]) -> None:
    _, report = bench
    assert [r["algorithm"] for r in report["results"]] == [*ALGORITHMS, "heron-block"]
    for r in report["results"]:
        for name, kind in FIELDS.items():
            assert isinstance(r[name], kind), (r["algorithm"], name, r.get(name))
        assert (r["model"], r["cut"], r["batch"], r["threads"]) == ("cnn", "conv1", 8, 1)
        assert r["threads_used"] == 1
        assert 0 < r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        assert len(r["step_ms_samples"]) == 2 and r["forward_ms_median"] > 0
        assert r["peak_rss_mb"] > 10 and r["flops_per_step"] > 0
        assert r["bytes_per_round"] == r["bytes_up_per_round"] + r["bytes_down_per_round"] > 0
        assert r["versions"]["python"] and r["versions"]["numpy"]


def test_onnx_runtime_algorithms_never_import_torch(bench: tuple[Path, dict[str, Any]]) -> None:
    for r in bench[1]["results"]:
        ort_side = r["algorithm"] in (*ONNX_ALGORITHMS, "heron-block")
        assert r["torch_imported"] is not ort_side, r["algorithm"]
        assert r["onnxruntime_imported"] is ort_side, r["algorithm"]
        assert ("onnxruntime" in r["versions"]) is ort_side
        assert ("torch" in r["versions"]) is not ort_side


def test_heron_makes_two_forwards_per_step_and_counts_their_flops(
        bench: tuple[Path, dict[str, Any]]) -> None:
    by = {r["algorithm"]: r for r in bench[1]["results"]}
    assert by["heron"]["forwards_per_step"] == 2 and by["frozen"]["forwards_per_step"] == 1
    assert by["heron"]["flops_per_step"] == 2 * by["frozen"]["flops_per_step"]
    assert by["fedavg"]["flops_per_step"] > by["cse-fsl"]["flops_per_step"]
    assert by["heron"]["trained_params"] == by["cse-fsl"]["trained_params"]
    assert by["sflv1"]["trained_params"] < by["cse-fsl"]["trained_params"]  # no aux head
    # block-wise: the unperturbed pass plus a partial re-run (cnn: conv1 or the aux head)
    block = by["heron-block"]
    assert block["perturb"] == "block" and block["segment_chain"]["segments"] == ["conv1", "aux"]
    assert by["frozen"]["flops_per_step"] < block["flops_per_step"] < by["heron"]["flops_per_step"]


def test_bench_writes_json_markdown_and_plot(bench: tuple[Path, dict[str, Any]]) -> None:
    out, report = bench
    saved = json.loads((out / "cost.json").read_text())
    assert saved["results"] == report["results"]
    assert saved["ratios_vs_cse_fsl"]["cse-fsl"]["peak_rss"] == 1.0
    assert {t["target"] for t in saved["targets"]} == {"memory", "speed vs forwards",
                                                       "speed vs cse-fsl",
                                                       "block speed vs cse-fsl"}
    assert all(t["measured"] is not None for t in saved["targets"])
    table = (out / "cost.md").read_text()
    for alg in (*ALGORITHMS, "heron-block"):
        assert f"| {alg} |" in table
    pytest.importorskip("matplotlib")
    assert (out / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heron_profile_command_prints_one_json_object(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    proc = subprocess.run(
        heron("profile", "--model", "cnn", "--input-shape", "1,8,8", "--batch", "8",
              "--algorithm", "heron", "--threads", "1", "--steps", "2", "--out", str(out),
              "--smashed-codec", "int8"),
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["algorithm"] == "heron" and printed["torch_imported"] is False
    assert printed["steps"] == printed["warmup"] == 2
    assert printed["smashed_codec"] == "int8" and printed["smashed_bytes"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "sfl"], "invalid choice"),
    (["--input-shape", "8,8"], "expected C,H,W"),
    (["--model", "vgg"], "unknown model"),
    (["--model", "cnn", "--cut", "layer9"], "unknown cut"),
])
def test_bad_profile_options_fail_with_a_hint(argv: list[str], message: str) -> None:
    proc = subprocess.run(heron("profile", *argv), capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode != 0 and message in proc.stderr


def test_bench_repeats_keep_each_algorithms_fastest_run(tmp_path: Path) -> None:
    report = run_cost(tmp_path, steps=1, warmup=0, threads=1, repeats=2,
                      algorithms=("heron", "frozen"), progress=lambda _: None, **TINY)
    assert report["config"]["repeats"] == 2 and report["ratios_vs_cse_fsl"] is None
    for r in report["results"]:
        assert len(r["repeats_step_ms_median"]) == 2
        assert r["step_ms_mean"] == min(r["repeats_step_ms_mean"])
    with pytest.raises(ValueError, match="unknown algorithms"):
        run_cost(tmp_path, algorithms=("sfl",), **TINY)


def test_block_wise_heron_profiles_its_segment_chain_without_torch(tmp_path: Path) -> None:
    from baselines.profile import profile

    full = export_split("cnn", (1, 8, 8), 10, tmp_path / "b")
    r = profile("heron", threads=1, steps=2, warmup=1, bundle_dir=tmp_path / "b",
                perturb="block", **TINY)
    assert r["perturb"] == "block" and r["torch_imported"] is False
    assert r["segment_chain"]["segments"] == ["conv1", "aux"]
    assert r["forwards_per_step"] == 2 and r["step_ms_median"] > 0 and r["forward_ms_median"] > 0
    one_forward = onnx_graph_flops(tmp_path / "b" / "train.onnx", TINY["batch"])
    # the unperturbed pass plus a partial re-run, in expectation over the drawn block
    assert one_forward < r["flops_per_step"] < 2 * one_forward
    sizes = [s.size for s in full.segments]
    assert r["trained_params"] == sum(sizes)


def test_block_wise_heron_with_q_directions_reruns_q_blocks_per_step(tmp_path: Path) -> None:
    """q = 2: one unperturbed pass plus two block re-runs per step; the FLOPs grow by
    exactly one more averaged re-run over q = 1 on the same draws (block_flops is linear in
    q), and the result records q."""
    from baselines.counts import block_flops
    from baselines.profile import profile
    from edge_runtime.bundle import load_bundle

    export_split("cnn", (1, 8, 8), 10, tmp_path / "b")
    r = profile("heron", threads=1, steps=4, warmup=0, bundle_dir=tmp_path / "b",
                perturb="block", q=2, **TINY)
    assert r["q"] == 2 and r["perturb"] == "block" and r["forwards_per_step"] == 3
    draws = r["segment_chain"]["draws"]
    assert sum(draws) == 2 * 4  # each of the 4 timed steps drew q blocks (no warm-up)
    bundle = load_bundle(tmp_path / "b")
    one, two = (block_flops(bundle, TINY["batch"], draws, q) for q in (1, 2))
    assert r["flops_per_step"] == two
    full_pass = block_flops(bundle, TINY["batch"], [0] * len(draws), 1)  # no re-run drawn
    assert two - one == one - full_pass > 0


def test_perturb_is_a_heron_option_only() -> None:
    from baselines.steps import StepSpec

    common: dict[str, Any] = {"model": "cnn", "cut": "conv1", "batch": 8, "threads": 1,
                              "input_shape": (1, 8, 8), "num_classes": 10, "bundle_dir": "b"}
    with pytest.raises(ValueError, match="heron option"):
        StepSpec(algorithm="frozen", perturb="block", **common)
    with pytest.raises(ValueError, match="perturb"):
        StepSpec(algorithm="heron", perturb="layer", **common)
    with pytest.raises(ValueError, match="heron option"):
        StepSpec(algorithm="frozen", q=2, **common)
    with pytest.raises(ValueError, match="q must be >= 1"):
        StepSpec(algorithm="heron", q=0, **common)
    assert StepSpec.from_json(StepSpec(algorithm="heron", perturb="block",
                                       **common).to_json()).perturb == "block"


def test_minilm_profile_feeds_token_batches_and_counts_flops_like_torch(tmp_path: Path) -> None:
    """Text models profile on int64 (token ids, mask) batches; the ONNX FLOP count (which
    needs ONNX Runtime's symbolic shapes for the aux Slice) equals torch's on the same
    forward, and the device step makes two such forwards."""
    from baselines.profile import profile

    shape = (2, 8)
    export_split("minilm", shape, 2, tmp_path / "b")
    split = build_split("minilm", shape, 2)
    x = torch.ones(4, *shape, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        train_graph(split)(x, torch.zeros(4, dtype=torch.long))
    one_forward = onnx_graph_flops(tmp_path / "b" / "train.onnx", 4)
    assert one_forward == counter.get_total_flops()
    r = profile("heron", model="minilm", batch=4, threads=1, steps=2, warmup=1,
                input_shape=shape, num_classes=2, bundle_dir=tmp_path / "b")
    assert r["input_shape"] == [2, 8] and r["torch_imported"] is False
    assert r["flops_per_step"] == 2 * one_forward and r["trained_params"] == 49_922
    assert r["peak_rss_mb"] > r["rss_after_import_mb"] > 0


def test_profile_command_takes_a_text_model_with_its_own_defaults() -> None:
    proc = subprocess.run(heron("profile", "--model", "minilm", "--input-shape", "3,8,8"),
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "--max-length" in proc.stderr


def test_profile_codes_smashed_uploads_in_the_step_and_sizes_them_by_codec(
        tmp_path: Path) -> None:
    """`smashed_codec`: the runner's step leaves the wire chunks of a coded Smashed message,
    and the byte model sizes the upload by the codec, not as float32."""
    import math

    from baselines.profile import profile
    from baselines.steps import StepSpec, make_runner
    from edge_runtime.protocol import Reassembler, decode

    export_split("cnn", (1, 8, 8), 10, tmp_path / "b")
    spec = StepSpec(algorithm="heron", model="cnn", cut="conv1", batch=8, threads=1,
                    input_shape=(1, 8, 8), num_classes=10, bundle_dir=str(tmp_path / "b"),
                    smashed_codec="int8")
    sent = {}
    for uplink in ("thread", "inline"):  # the device's uplink thread, and inside the step
        runner = make_runner(replace(spec, uplink=uplink))
        times = runner.steps(2)  # step 0 uploads (k = 2)
        assert len(times) == 2 and min(times) > 0
        raw = None
        for part in runner.uploads.last or []:  # type: ignore[attr-defined]
            raw = Reassembler().add("t", part) or raw
        assert raw is not None
        sent[uplink] = msg = decode(raw)
        assert msg.codec == "int8" and msg.activations.dtype.name == "uint8"  # type: ignore[attr-defined]
    # the same batch, coded the same way on either thread
    assert np.array_equal(sent["thread"].activations, sent["inline"].activations)  # type: ignore[attr-defined]
    shape = msg.activations.shape  # type: ignore[attr-defined]

    got = {c: profile("heron", threads=1, steps=2, warmup=0, bundle_dir=tmp_path / "b",
                      smashed_codec=c, **TINY) for c in ("fp32", "fp16", "int8")}
    n, channels = math.prod(shape), shape[1]  # values in one batch; int8: one scale per channel
    fp32 = got["fp32"]["smashed_bytes"]
    # fp16: 2 bytes less per value; the header differs only in the dtype name, float16 and
    # float32 being as long
    assert got["fp16"]["smashed_bytes"] == fp32 - 2 * n
    # int8: a quarter of the values' bytes, plus float32 scale and offset per channel; the
    # header names uint8 (2 characters shorter than float32) and their shapes [C], not [0]
    header = len("uint8") - len("float32") + 2 * (len(str(channels)) - len("0"))
    assert got["int8"]["smashed_bytes"] == fp32 - 3 * n + 2 * 4 * channels + header
    for c, r in got.items():
        assert r["smashed_codec"] == c and r["torch_imported"] is False
        # heron uploads every k = 2 of h = 40 steps: 20 per round, the update on top
        assert r["bytes_up_per_round"] > 20 * r["smashed_bytes"]
    assert got["int8"]["bytes_up_per_round"] < 0.3 * got["fp32"]["bytes_up_per_round"]


def test_an_unknown_smashed_codec_is_refused_and_a_known_one_round_trips() -> None:
    from baselines.steps import StepSpec

    common: dict[str, Any] = {"model": "cnn", "cut": "conv1", "batch": 8, "threads": 1,
                              "input_shape": (1, 8, 8), "num_classes": 10, "bundle_dir": "b"}
    # a run-wide setting: fedavg uploads no smashed data and has nothing to code, as in
    # `heron run --algorithm fedavg` under the default codec
    assert StepSpec(algorithm="fedavg", **common).smashed_codec == "int8"
    with pytest.raises(ValueError, match="unknown smashed codec"):
        StepSpec(algorithm="heron", smashed_codec="int4", **common)
    assert StepSpec.from_json(StepSpec(algorithm="heron", smashed_codec="fp16",
                                       **common).to_json()).smashed_codec == "fp16"


def test_heron_tail_profile_runs_only_the_tail_graph(tmp_path: Path) -> None:
    """A heron-tail device never opens its training graph, so neither may the profile's
    runner: that session would be counted in the step's peak RSS."""
    from baselines.profile import export_bundle
    from baselines.steps import StepSpec, TailRunner, make_runner

    export_bundle("cnn", (1, 8, 8), 10, "conv1", tmp_path / "b", tail_batch=8)
    spec = StepSpec(algorithm="heron-tail", model="cnn", cut="conv1", batch=8, threads=1,
                    input_shape=(1, 8, 8), num_classes=10, bundle_dir=str(tmp_path / "b"))
    runner = make_runner(spec)
    assert isinstance(runner, TailRunner)
    assert len(runner.steps(2)) == 2 and len(runner.forwards(2)) == 2
    assert runner.model._session is None  # type: ignore[attr-defined]
