"""Exported bundle vs torch: same loss, smashed data and logits, with weights fed as inputs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edge_runtime.bundle import Bundle, load_bundle
from exporter.export import (
    export_bundle,
    export_split,
    flat_from_split,
    flat_to_state,
    load_flat_into,
    train_graph,
)
from exporter.zoo import SplitModel, build_split

NUM_CLASSES = 10
CASES: list[tuple[str, tuple[int, int, int], str]] = [
    ("cnn", (1, 8, 8), "conv1"),
    ("cnn", (1, 8, 8), "conv2"),
    ("cnn", (1, 28, 28), "conv1"),
    ("cnn", (1, 28, 28), "conv2"),
    ("fedcnn", (1, 28, 28), "conv1"),
    ("fedcnn", (1, 28, 28), "conv2"),
    ("resnet18", (3, 32, 32), "stem"),
    ("resnet18", (3, 32, 32), "layer1"),
    ("resnet18", (3, 32, 32), "layer2"),
]
IDS = [f"{m}-{'x'.join(map(str, s))}-{c}" for m, s, c in CASES]


@dataclass
class Exported:
    split: SplitModel
    bundle: Bundle
    session: ort.InferenceSession


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    model, shape, cut = request.param
    split = build_split(model, shape, NUM_CLASSES, cut=cut, seed=0)
    out = tmp_path_factory.mktemp(f"{model}-{cut}")
    export_bundle(split, out)
    bundle = load_bundle(out)  # verifies both sha256s
    session = ort.InferenceSession(bundle.graph, providers=["CPUExecutionProvider"])
    return Exported(split, bundle, session)


def _batch(split: SplitModel, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *split.input_shape)).astype(np.float32)
    y = rng.integers(0, split.num_classes, size=n).astype(np.int64)
    return x, y


def _run_ort(ex: Exported, flat: np.ndarray, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    feed = {"x": x, "y": y, **ex.bundle.unflatten(flat)}
    return ex.session.run(["loss", "smashed", "logits"], feed)


def _run_torch(split: SplitModel, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        outs = train_graph(split)(torch.from_numpy(x), torch.from_numpy(y))
    return [o.numpy() for o in outs]


def _assert_outputs_close(ex: Exported, got: list[np.ndarray], want: list[np.ndarray]) -> None:
    # ResNet stacks many GroupNorms and convs; float32 reduction order differs between backends.
    tol = 3e-4 if ex.split.model == "resnet18" else 1e-4
    for name, g, w in zip(("loss", "smashed", "logits"), got, want, strict=True):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("batch", [4, 7])
def test_ort_matches_torch_at_exported_weights(exported: Exported, batch: int) -> None:
    x, y = _batch(exported.split, batch, seed=batch)
    got = _run_ort(exported, exported.bundle.weights, x, y)
    _assert_outputs_close(exported, got, _run_torch(exported.split, x, y))
    assert got[1].shape == (batch, *exported.split.smashed_shape)
    assert got[2].shape == (batch, NUM_CLASSES)


def test_ort_matches_torch_at_perturbed_weights(exported: Exported) -> None:
    """Weights are real graph inputs: changing them changes ORT exactly as it changes torch."""
    manifest = exported.bundle.manifest
    rng = np.random.default_rng(42)
    flat = exported.bundle.weights + 0.01 * rng.standard_normal(manifest.num_params)
    flat = flat.astype(np.float32)
    twin = build_split(manifest.model, exported.split.input_shape, NUM_CLASSES,
                       cut=manifest.cut, seed=0)
    load_flat_into(twin, manifest, flat)
    x, y = _batch(twin, 4, seed=0)
    got = _run_ort(exported, flat, x, y)
    _assert_outputs_close(exported, got, _run_torch(twin, x, y))
    base = _run_ort(exported, exported.bundle.weights, x, y)
    assert not np.allclose(got[2], base[2])


def test_graph_inputs_are_data_then_manifest_params(exported: Exported) -> None:
    manifest = exported.bundle.manifest
    inputs = exported.session.get_inputs()
    assert [i.name for i in inputs] == ["x", "y", *(p.name for p in manifest.params)]
    assert isinstance(inputs[0].shape[0], str) and isinstance(inputs[1].shape[0], str)
    assert list(inputs[0].shape[1:]) == list(manifest.input_shape)
    for spec, inp in zip(manifest.params, inputs[2:], strict=True):
        assert tuple(inp.shape) == spec.shape and inp.type == "tensor(float)"
        assert spec.role == spec.name.split(".", 1)[0]
    graph = onnx.load_from_string(exported.bundle.graph).graph
    assert not {i.name for i in graph.initializer} & {p.name for p in manifest.params}


def test_manifest_describes_the_split(exported: Exported) -> None:
    manifest, split = exported.bundle.manifest, exported.split
    assert (manifest.model, manifest.cut) == (split.model, split.cut)
    assert manifest.input_shape == split.input_shape
    assert manifest.smashed_shape == split.smashed_shape
    assert manifest.num_classes == NUM_CLASSES and manifest.opset == 17
    assert manifest.extra["aux"] == "gap+fc" and manifest.extra["exported_by"] == "heron"
    roles = [p.role for p in manifest.params]
    assert roles == sorted(roles, key=("client", "aux").index)  # client first, then aux
    n = sum(p.numel() for m in (split.client, split.aux) for p in m.parameters())
    assert manifest.num_params == n


def test_flat_round_trip(exported: Exported) -> None:
    manifest, split = exported.bundle.manifest, exported.split
    np.testing.assert_array_equal(flat_from_split(split, manifest), exported.bundle.weights)
    twin = build_split(manifest.model, split.input_shape, NUM_CLASSES, cut=manifest.cut, seed=1)
    flat = np.random.default_rng(0).standard_normal(manifest.num_params).astype(np.float32)
    load_flat_into(twin, manifest, flat)
    np.testing.assert_array_equal(flat_from_split(twin, manifest), flat)
    state = flat_to_state(manifest, flat)
    assert list(state) == [p.name for p in manifest.params]
    assert all(tuple(state[p.name].shape) == p.shape for p in manifest.params)


def test_load_flat_into_rejects_wrong_length(exported: Exported) -> None:
    manifest = exported.bundle.manifest
    with pytest.raises(ValueError, match="expected"):
        load_flat_into(exported.split, manifest, np.zeros(manifest.num_params - 1, np.float32))


def test_load_flat_into_rejects_other_cut(tmp_path: Path) -> None:
    manifest = export_split("cnn", (1, 8, 8), NUM_CLASSES, tmp_path, cut="conv2")
    other = build_split("cnn", (1, 8, 8), NUM_CLASSES, cut="conv1")
    with pytest.raises(ValueError, match="bundle"):
        load_flat_into(other, manifest, np.zeros(manifest.num_params, np.float32))


def test_frozen_params_stay_initializers(tmp_path: Path) -> None:
    """Future LoRA: frozen base weights are baked in, only trainable ones are inputs."""
    split = build_split("cnn", (1, 8, 8), NUM_CLASSES, cut="conv1")
    split.client.conv1[0].weight.requires_grad_(False)
    manifest = export_bundle(split, tmp_path)
    assert [p.name for p in manifest.params] == [
        "client.conv1.0.bias", "aux.fc.weight", "aux.fc.bias"]
    bundle = load_bundle(tmp_path)
    graph = onnx.load_from_string(bundle.graph).graph
    assert [i.name for i in graph.initializer] == ["client.conv1.0.weight"]
    session = ort.InferenceSession(bundle.graph, providers=["CPUExecutionProvider"])
    ex = Exported(split, bundle, session)
    x, y = _batch(split, 4, seed=0)
    _assert_outputs_close(ex, _run_ort(ex, bundle.weights, x, y), _run_torch(split, x, y))


def test_unused_trainable_param_is_a_clear_error(tmp_path: Path) -> None:
    split = build_split("cnn", (1, 8, 8), NUM_CLASSES)
    split.client.register_parameter("unused", nn.Parameter(torch.zeros(3)))
    with pytest.raises(RuntimeError, match="client.unused"):
        export_bundle(split, tmp_path)


def test_export_emits_no_warnings(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_split("resnet18", (3, 32, 32), NUM_CLASSES, tmp_path, cut="stem")


def test_unknown_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        export_split("vgg16", (3, 32, 32), NUM_CLASSES, tmp_path)


def test_unknown_cut_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown cut.*conv1.*conv2"):
        export_split("cnn", (1, 8, 8), NUM_CLASSES, tmp_path, cut="conv3")
