"""Bundle manifest: the input dtype is recorded, read back, and defaults for old bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from edge_runtime.bundle import MANIFEST, load_bundle, write_bundle
from edge_runtime.manifest import BundleError, Manifest

# a real (if unrelated) ONNX model: load_bundle parses every graph it verifies
GRAPH = helper.make_model(helper.make_graph(
    [helper.make_node("Identity", ["x"], ["y"])], "g",
    [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])).SerializeToString()


def _write(out: Path, input_dtype: str) -> Manifest:
    return write_bundle(out, onnx_bytes=GRAPH, params=[("client.w", np.ones((2, 3)), "client")],
                        model="minilm", cut="layer3", input_shape=(2, 16), num_classes=2,
                        smashed_shape=(16, 385), opset=17, input_dtype=input_dtype)


@pytest.mark.parametrize("dtype", ["float32", "int64"])
def test_input_dtype_round_trips(tmp_path: Path, dtype: str) -> None:
    written = _write(tmp_path, dtype)
    assert written.input_dtype == dtype
    assert json.loads((tmp_path / MANIFEST).read_text())["input"]["dtype"] == dtype
    assert load_bundle(tmp_path).manifest.input_dtype == dtype


def test_manifest_without_input_dtype_reads_as_float32(tmp_path: Path) -> None:
    obj = _write(tmp_path, "int64").to_json()
    del obj["input"]["dtype"]
    assert Manifest.from_json(obj).input_dtype == "float32"


def test_unknown_input_dtype_is_refused(tmp_path: Path) -> None:
    obj = _write(tmp_path, "int64").to_json()
    obj["input"]["dtype"] = "uint8"
    with pytest.raises(BundleError, match="input dtype 'uint8'"):
        Manifest.from_json(obj)
    with pytest.raises(BundleError, match="input dtype"):
        _write(tmp_path / "b", "float16")
