"""Counted costs of a device step: ONNX FLOPs against torch's FLOP counter on the same
forward, and payload bytes against what each protocol sends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from baselines.counts import onnx_graph_flops, payload_bytes
from baselines.steps import ALGORITHMS
from edge_runtime.protocol import Smashed, encode
from exporter.export import export_split, train_graph
from exporter.zoo import build_split


def test_onnx_flops_equal_torch_flop_counter_on_the_same_forward(tmp_path: Path) -> None:
    for model, shape in (("cnn", (1, 8, 8)), ("resnet18", (3, 8, 8))):
        manifest = export_split(model, shape, 10, tmp_path / model)
        graph = train_graph(build_split(model, shape, 10))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            graph(torch.zeros(4, *shape), torch.zeros(4, dtype=torch.long))
        assert onnx_graph_flops(tmp_path / model / "train.onnx", 4) == \
            counter.get_total_flops(), manifest.model


def test_payload_bytes_follow_each_protocol() -> None:
    kw: dict[str, Any] = {"batch": 8, "smashed_shape": (16, 8, 8), "device_params": 330,
                          "local_steps": 10, "upload_every": 2, "smashed_codec": "fp32"}
    b = {alg: payload_bytes(alg, **kw) for alg in ALGORITHMS}
    smashed = len(encode(Smashed("0" * 32, 1, "dev-0", activations=np.zeros(
        (8, 16, 8, 8), np.float32), labels=np.zeros(8, np.int64))))
    assert smashed > 8 * 16 * 8 * 8 * 4
    assert b["heron"]["bytes_per_step"] >= math.floor(smashed / 2)  # every 2nd step
    assert b["sflv1"]["bytes_per_step"] > 2 * smashed - 1  # smashed up and gradient down
    assert b["sflv1"] == b["sflv2"]
    assert b["fedavg"]["bytes_per_step"] == 0
    assert b["heron"]["bytes_per_round"] == b["cse-fsl"]["bytes_per_round"]  # same messages
    # frozen: the smashed uploads, then an update without weights (header and telemetry)
    assert 0 < b["frozen"]["bytes_up_per_round"] - 5 * smashed < 330 * 4
    assert b["frozen"]["bytes_down_per_round"] == b["heron"]["bytes_down_per_round"]
    with pytest.raises(ValueError, match="unknown algorithm"):
        payload_bytes("nope", **kw)
