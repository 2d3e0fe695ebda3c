"""heron-tail on the device (edge_runtime/tail.py, runtime.train_round): the manifest's tail
entry is validated like every bundle field, the tail graph is checked against it before any
step, and exact-gradient steps lower the aux loss while the rest of θ stays frozen."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.bundle import Bundle, load_bundle
from edge_runtime.manifest import MAX_TAIL_BATCH, BundleError, Manifest
from edge_runtime.protocol import OptimizerConfig, TrainConfig
from edge_runtime.runtime import LocalModel, train_round
from edge_runtime.tail import fixed_batch
from exporter.export import export_bundle
from exporter.tail_grad import mark_tail_trainable
from exporter.zoo import build_split
from heron_data.datasets import load_dataset

BATCH = 8
TAIL = ("client.conv2.0.weight", "client.conv2.0.bias", "aux.fc.weight", "aux.fc.bias")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    split = build_split("cnn", (1, 8, 8), 10, cut="conv2", seed=0)
    mark_tail_trainable(split)
    out = tmp_path_factory.mktemp("tail") / "b"
    export_bundle(split, out, tail_batch=BATCH)
    return load_bundle(out)


@pytest.fixture(scope="module")
def model(bundle: Bundle) -> LocalModel:
    return LocalModel(bundle, threads=1)


def _shard(n: int) -> tuple[np.ndarray, np.ndarray]:
    ds = load_dataset("digits")
    return ds.x_train[:n], ds.y_train[:n]


def _cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"algorithm": "heron-tail", "batch_size": BATCH, "local_steps": 30,
                            "upload_every": 1,
                            "optimizer": OptimizerConfig(name="adam", lr=1e-2)}
    return TrainConfig(**{**base, **kw})


# --- the manifest entry ------------------------------------------------------------------

BAD_TAILS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "batch 0": (lambda t: t.update(batch=0), "batch must be an integer"),
    "huge batch": (lambda t: t.update(batch=MAX_TAIL_BATCH + 1), "batch must be an integer"),
    "bool batch": (lambda t: t.update(batch=True), "batch must be an integer"),
    "string batch": (lambda t: t.update(batch="8"), "batch must be an integer"),
    "unknown param": (lambda t: t["trained"].append("client.conv9.weight"),
                      "not manifest params"),
    "no params": (lambda t: t.update(trained=[]), "non-empty list"),
    "repeated param": (lambda t: t["trained"].append(t["trained"][0]), "distinct"),
    "out of order": (lambda t: t["trained"].reverse(), "manifest param order"),
    "file not listed": (lambda t: t.update(file="other.onnx"), "not a plain file name"),
    "file in a folder": (lambda t: t.update(file="../tail.onnx"), "not a plain file name"),
    "extra key": (lambda t: t.update(code="x"), "exactly file, tail_set, trained and batch"),
    "not an object": (lambda t: t.clear(), "exactly file"),
}


@pytest.mark.parametrize("case", list(BAD_TAILS))
def test_a_bad_tail_entry_is_refused(bundle: Bundle, case: str) -> None:
    obj = bundle.manifest.to_json()
    mutate, why = BAD_TAILS[case]
    mutate(obj["tail"])
    with pytest.raises(BundleError, match=why):
        Manifest.from_json(obj)


def test_a_tail_graph_that_does_not_fit_its_manifest_is_refused(bundle: Bundle) -> None:
    assert bundle.manifest.tail is not None
    other = dataclasses.replace(bundle.manifest.tail, batch=BATCH + 1)
    lying = dataclasses.replace(bundle, manifest=dataclasses.replace(bundle.manifest, tail=other))
    with pytest.raises(BundleError, match="do not match the manifest"):
        LocalModel(lying, threads=1).tail()
    none = dataclasses.replace(bundle, tail=None,
                               manifest=dataclasses.replace(bundle.manifest, tail=None))
    with pytest.raises(BundleError, match="no tail-gradient graph"):
        LocalModel(none, threads=1).tail()


def test_a_tampered_tail_graph_fails_its_sha(bundle: Bundle, tmp_path: Path) -> None:
    assert bundle.root is not None
    for f in bundle.root.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tail.onnx").write_bytes((tmp_path / "tail.onnx").read_bytes() + b"\0")
    with pytest.raises(BundleError, match="tail.onnx sha256"):
        load_bundle(tmp_path)


# --- the device step ---------------------------------------------------------------------

def test_tail_steps_lower_the_aux_loss_and_train_only_the_tail(model: LocalModel,
                                                               bundle: Bundle) -> None:
    x, y = _shard(BATCH)  # every step the same 8 samples (in a new order)
    theta0 = bundle.weights.copy()
    loss0 = model.loss(theta0, x, y)
    result = train_round(model, theta0, x, y, _cfg(), round_idx=0, device_id="dev-0")
    assert np.array_equal(theta0, bundle.weights)  # the caller's vector is not written to
    assert result.losses[0] == pytest.approx(loss0, rel=1e-5)  # the graph's loss is the aux loss
    # 30 Adam steps at 1e-2 on one batch fit it: observed 2.36 -> 0.31; half is far from it
    assert model.loss(result.theta, x, y) < 0.5 * loss0
    for p in bundle.manifest.params:
        moved = not np.array_equal(result.theta[p.offset:p.offset + p.size],
                                   theta0[p.offset:p.offset + p.size])
        assert moved == (p.name in TAIL), p.name
    assert result.seeds.size == 0 and len(result.step_ms) == 30


def test_a_short_batch_is_padded_and_only_its_real_samples_are_uploaded(
        model: LocalModel, bundle: Bundle) -> None:
    x, y = _shard(BATCH + 3)  # an epoch: a full batch, then 3 samples padded to 8
    sent: list[tuple[int, np.ndarray, np.ndarray]] = []
    result = train_round(model, bundle.weights, x, y, _cfg(local_steps=2), round_idx=0,
                         device_id="dev-0", on_smashed=lambda s, a, lab: sent.append((s, a, lab)))
    assert [(s, len(a), len(lab)) for s, a, lab in sent] == [(0, 8, 8), (1, 3, 3)]
    assert sorted([*sent[0][2], *sent[1][2]]) == sorted(y)  # every sample once in the epoch
    assert result.smashed_sent == 2
    assert fixed_batch(np.array([4, 5, 6]), 8).tolist() == [4, 5, 6, 4, 5, 6, 4, 5]
    with pytest.raises(ValueError, match="empty"):
        fixed_batch(np.array([], dtype=np.int64), 8)


def test_a_round_at_another_batch_size_is_refused(model: LocalModel, bundle: Bundle) -> None:
    with pytest.raises(ValueError, match="exported for batch 8"):
        train_round(model, bundle.weights, *_shard(20), _cfg(batch_size=16), round_idx=0,
                    device_id="dev-0")


def test_tail_session_runs_without_the_arena_and_prepacked_weights(model: LocalModel) -> None:
    # both only raise the peak RSS of a graph of many short-lived tensors over mapped weights
    opts = model.tail().session.get_session_options()
    assert opts.enable_cpu_mem_arena is False
    assert opts.get_session_config_entry("session.disable_prepacking") == "1"
