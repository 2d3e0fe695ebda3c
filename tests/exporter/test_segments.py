"""The segment chain in the bundle: chained in ONNX Runtime it computes what the full
training graph and torch compute; each segment owns its slice of the flat weights; bundles
with and without segments load, and tampered or malformed segment entries are refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edge_runtime.bundle import MANIFEST, Bundle, bundle_from_files, load_bundle, read_bundle_files
from edge_runtime.manifest import (
    LABEL_NAME,
    LOSS_OUTPUT,
    NCHWC_LAYOUTS,
    SEGMENT_INPUT,
    SEGMENT_OUTPUT,
    BundleError,
)
from exporter.export import export_bundle, train_graph
from exporter.segments import segment_blocks
from exporter.zoo import SplitModel, build_split

CASES = {
    "resnet18-layer1": ("resnet18", (3, 32, 32), "layer1", ["stem", "layer1.0", "layer1.1",
                                                            "aux"]),
    "cnn-conv1": ("cnn", (1, 8, 8), "conv1", ["conv1", "aux"]),
    "fedcnn-conv2": ("fedcnn", (1, 28, 28), "conv2", ["conv1", "conv2", "aux"]),
}


@dataclass
class Exported:
    split: SplitModel
    bundle: Bundle
    path: Path
    names: list[str]


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Exported:
    model, shape, cut, names = CASES[request.param]
    split = build_split(model, shape, 10, cut=cut, seed=0)
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    export_bundle(split, out)
    return Exported(split, load_bundle(out), out, names)


def _sessions(bundle: Bundle) -> tuple[ort.InferenceSession, list[ort.InferenceSession]]:
    def make(graph: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return make(bundle.graph), [make(g) for g in bundle.segments]


def _chain(bundle: Bundle, segments: list[ort.InferenceSession], flat: np.ndarray,
           x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(loss, smashed) through the segment graphs, each fed its own params only."""
    views = bundle.unflatten(flat)
    h = x
    for spec, sess in zip(bundle.manifest.segments[:-1], segments[:-1], strict=True):
        h = sess.run([SEGMENT_OUTPUT], {SEGMENT_INPUT: h, **{n: views[n] for n in spec.params}})[0]
    last = bundle.manifest.segments[-1]
    loss = segments[-1].run([LOSS_OUTPUT], {SEGMENT_INPUT: h, LABEL_NAME: y,
                                            **{n: views[n] for n in last.params}})[0]
    return float(loss), h


def _batch(split: SplitModel, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *split.input_shape)).astype(np.float32),
            rng.integers(0, split.num_classes, n).astype(np.int64))


def test_segments_are_the_blocks_and_tile_the_flat_vector(exported: Exported) -> None:
    m = exported.bundle.manifest
    assert [s.name for s in m.segments] == exported.names
    offset = 0
    flat_names = [p.name for p in m.params]
    at = 0
    for spec in m.segments:
        assert spec.offset == offset and spec.size >= 0
        assert list(spec.params) == flat_names[at:at + len(spec.params)]
        offset, at = offset + spec.size, at + len(spec.params)
    assert offset == m.num_params and at == len(m.params)
    assert m.segments[-1].params == tuple(p.name for p in m.params if p.role == "aux")
    assert len(exported.bundle.segments) == len(m.segments)


@pytest.mark.parametrize("batch", [3, 17])
@pytest.mark.parametrize("perturbed", [False, True], ids=["exported", "perturbed"])
def test_chained_segments_match_the_full_graph_and_torch(exported: Exported, batch: int,
                                                         perturbed: bool) -> None:
    b = exported.bundle
    flat = b.weights.copy()
    if perturbed:
        flat += 0.05 * np.random.default_rng(1).standard_normal(flat.size).astype(np.float32)
    x, y = _batch(exported.split, batch, seed=batch)
    full, segments = _sessions(b)
    loss, smashed = _chain(b, segments, flat, x, y)
    want_loss, want_smashed = full.run([LOSS_OUTPUT, "smashed"],
                                       {"x": x, "y": y, **b.unflatten(flat)})
    assert smashed.shape == (batch, *b.manifest.smashed_shape)
    np.testing.assert_allclose(smashed, want_smashed, rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(float(want_loss), rel=1e-5)
    # and torch's forward at the same weights
    split = build_split(exported.split.model, exported.split.input_shape, 10,
                        cut=exported.split.cut, seed=0)
    graph = train_graph(split)
    with torch.no_grad():
        for name, param in graph.named_parameters():
            param.copy_(torch.from_numpy(b.unflatten(flat)[name].copy()))
        t_loss, t_smashed, _ = graph(torch.from_numpy(x), torch.from_numpy(y))
    tol = 3e-4 if exported.split.model == "resnet18" else 1e-4
    np.testing.assert_allclose(smashed, t_smashed.numpy(), rtol=tol, atol=tol)
    assert loss == pytest.approx(float(t_loss), rel=tol, abs=tol)


def test_segment_inputs_are_activation_label_and_own_params(exported: Exported) -> None:
    _, segments = _sessions(exported.bundle)
    specs = exported.bundle.manifest.segments
    for i, (spec, sess) in enumerate(zip(specs, segments, strict=True)):
        label = [LABEL_NAME] if i == len(specs) - 1 else []
        assert [x.name for x in sess.get_inputs()] == [SEGMENT_INPUT, *label, *spec.params]
        out = LOSS_OUTPUT if i == len(specs) - 1 else SEGMENT_OUTPUT
        assert [o.name for o in sess.get_outputs()] == [out]


def test_server_reads_and_sends_the_segment_files(exported: Exported) -> None:
    files = read_bundle_files(exported.path)
    assert {s.file for s in exported.bundle.manifest.segments} <= set(files)
    again = bundle_from_files(files)
    assert again.segments == exported.bundle.segments


def _copy(exported: Exported, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(exported.path, out)
    return out


@pytest.mark.parametrize("which", ["file", "nchwc_file"])
def test_a_tampered_segment_is_refused(exported: Exported, tmp_path: Path, which: str) -> None:
    out = _copy(exported, tmp_path)
    seg = out / getattr(exported.bundle.manifest.segments[0], which)
    seg.write_bytes(seg.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(out)


def test_a_missing_segment_file_is_refused(exported: Exported, tmp_path: Path) -> None:
    out = _copy(exported, tmp_path)
    (out / exported.bundle.manifest.segments[-1].file).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(out)


def _edit_manifest(out: Path, edit: object) -> None:
    obj = json.loads((out / MANIFEST).read_text())
    edit(obj)  # type: ignore[operator]
    (out / MANIFEST).write_text(json.dumps(obj))


@pytest.mark.parametrize("edit", [
    lambda m: m["segments"][1].__setitem__("offset", m["segments"][1]["offset"] + 1),
    lambda m: m["segments"][0].__setitem__("size", m["segments"][0]["size"] - 1),
    lambda m: m["segments"][0]["params"].pop(),
    lambda m: m["segments"].pop(),
    lambda m: m["segments"][0].__setitem__("file", "../train.onnx"),
    lambda m: m["segments"][0].__setitem__("file", "unlisted.onnx"),
    lambda m: m["segments"][1].__setitem__("file", m["segments"][0]["file"]),
    lambda m: m.__setitem__("segments", m["segments"][:1]),
    lambda m: m.__setitem__("segments", {"not": "a list"}),
    lambda m: m["segments"][0].__setitem__("nchwc_file", "unlisted.onnx"),
    lambda m: m["segments"][0].__setitem__("nchwc_file", m["segments"][0]["file"]),
], ids=["offset", "size", "params", "uncovered", "path", "unlisted", "shared-file",
        "one-segment", "not-a-list", "nchwc-unlisted", "nchwc-shared-file"])
def test_malformed_segment_entries_are_refused(exported: Exported, tmp_path: Path,
                                               edit: object) -> None:
    out = _copy(exported, tmp_path)
    _edit_manifest(out, edit)
    with pytest.raises(BundleError):
        load_bundle(out)


def test_a_bundle_without_segments_loads_as_before(exported: Exported, tmp_path: Path) -> None:
    out = _copy(exported, tmp_path)

    def drop(m: dict) -> None:
        for spec in m.pop("segments"):
            for file in filter(None, (spec["file"], spec.get("nchwc_file"))):
                del m["files"][file]
                (out / file).unlink()
    _edit_manifest(out, drop)
    bundle = load_bundle(out)
    assert bundle.manifest.segments == () and bundle.segments == ()
    assert "segments" not in bundle.manifest.to_json()
    assert np.array_equal(bundle.weights, exported.bundle.weights)


def test_a_client_that_is_not_a_chain_gets_no_segments(exported: Exported) -> None:
    split = exported.split
    odd = SplitModel(client=nn.Linear(4, 4), aux=split.aux, server=split.server,
                     model=split.model, cut=split.cut, input_shape=split.input_shape,
                     num_classes=split.num_classes, smashed_shape=split.smashed_shape)
    assert segment_blocks(odd) is None
    names = [name for name, _ in segment_blocks(split) or []]
    assert names == exported.names[:-1]


# --- the NCHWc variants -----------------------------------------------------------------------

def test_conv_segments_come_with_an_nchwc_variant_that_computes_the_same(
        exported: Exported) -> None:
    from edge_runtime.blockzo import reorder_filter

    b = exported.bundle
    specs = b.manifest.segments
    assert [s.nchwc_file is not None for s in specs] == [True] * (len(specs) - 1) + [False]
    assert b.nchwc_segments[-1] is None
    x, _ = _batch(exported.split, 4, seed=5)
    views = b.unflatten(b.weights)
    _, plain = _sessions(b)
    h = x
    matched = set()
    for spec, sess, variant in zip(specs[:-1], plain[:-1], b.nchwc_segments[:-1], strict=True):
        feed = {SEGMENT_INPUT: h, **{n: views[n] for n in spec.params}}
        want = sess.run([SEGMENT_OUTPUT], feed)[0]
        fast = ort.InferenceSession(variant, providers=["CPUExecutionProvider"])
        layouts = json.loads(fast.get_modelmeta().custom_metadata_map[NCHWC_LAYOUTS])
        assert layouts and set(layouts) <= set(spec.params)
        assert all(n.endswith("weight") and views[n].ndim == 4 for n in layouts)
        for block in (16, 8, 4):  # the CPU's block size is the one that reproduces `want`
            trial = {k: reorder_filter(v, layouts[k], block) if k in layouts else v
                     for k, v in feed.items()}
            try:
                got = fast.run([SEGMENT_OUTPUT], trial)[0]
            except Exception:  # this block size does not fit this CPU's kernels
                continue
            if np.allclose(got, want, rtol=1e-4, atol=1e-4):
                matched.add(block)
                break
        else:
            pytest.fail(f"no block size reproduces segment {spec.name}")
        h = want
    assert len(matched) == 1


def test_reorder_filter_is_a_blocked_transpose() -> None:
    from edge_runtime.blockzo import reorder_filter

    w = np.arange(32 * 16 * 3 * 3, dtype=np.float32).reshape(32, 16, 3, 3)
    got = reorder_filter(w, "OIHWBiBo", 8).reshape(4, 2, 3, 3, 8, 8)
    # [o block, i block, kh, kw, i in block, o in block]
    assert got[1, 0, 2, 1, 5, 3] == w[1 * 8 + 3, 0 * 8 + 5, 2, 1]
    got = reorder_filter(w[:, :3], "OIHWBo", 16).reshape(2, 3, 3, 3, 16)
    assert got[1, 2, 0, 2, 7] == w[16 + 7, 2, 0, 2]
    assert reorder_filter(w, "OIHWBiBo", 8).shape == w.shape
