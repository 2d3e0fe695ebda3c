"""Partitions are exact covers, reproducible by seed, skewed when asked; shards load on-device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edge_runtime.data import load_shard
from heron_data.partition import (
    label_histogram,
    partition,
    partition_dirichlet,
    partition_iid,
    write_shards,
)


def _labels(n: int = 1000, k: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n).astype(np.int64)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # disjoint and complete


def _mean_label_entropy(y: np.ndarray, parts: list[np.ndarray], k: int) -> float:
    hist = label_histogram(y, parts, k).astype(np.float64)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(ent.mean())


@pytest.mark.parametrize(("n", "n_devices"), [(10, 3), (100, 7), (5, 5), (9, 1)])
def test_iid_is_an_exact_cover_with_balanced_sizes(n: int, n_devices: int) -> None:
    parts = partition_iid(n, n_devices, np.random.default_rng(0))
    assert len(parts) == n_devices
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_is_an_exact_cover(alpha: float) -> None:
    y = _labels()
    parts = partition_dirichlet(y, 8, alpha, np.random.default_rng(1))
    assert len(parts) == 8
    _assert_exact_cover(parts, y.size)
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_respects_min_size() -> None:
    y = _labels()
    parts = partition_dirichlet(y, 10, 0.3, np.random.default_rng(2), min_size=20)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_handles_non_contiguous_labels() -> None:
    y = np.repeat(np.array([3, 7, 42]), 30)
    parts = partition_dirichlet(y, 4, 0.5, np.random.default_rng(0))
    _assert_exact_cover(parts, y.size)


def test_small_alpha_is_more_skewed_than_iid() -> None:
    y = _labels(2000)
    iid = partition(y, 10, "iid", seed=0)
    skewed = partition(y, 10, "dirichlet", alpha=0.1, seed=0)
    near_iid = partition(y, 10, "dirichlet", alpha=1000.0, seed=0)
    h_iid, h_skew = _mean_label_entropy(y, iid, 10), _mean_label_entropy(y, skewed, 10)
    assert h_skew < h_iid - 0.5
    assert _mean_label_entropy(y, near_iid, 10) == pytest.approx(h_iid, abs=0.05)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_deterministic_by_seed(scheme: str) -> None:
    y = _labels()
    a = partition(y, 6, scheme, alpha=0.5, seed=11)
    b = partition(y, 6, scheme, alpha=0.5, seed=11)
    c = partition(y, 6, scheme, alpha=0.5, seed=12)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_devices": 0}, "n_devices"),
        ({"n_devices": 101}, "101 devices"),
        ({"n_devices": 2, "alpha": 0.0}, "alpha"),
        ({"n_devices": 2, "alpha": -1.0}, "alpha"),
        ({"n_devices": 2, "scheme": "shards"}, "known: iid, dirichlet"),
    ],
)
def test_partition_rejects_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(_labels(100), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "y", [np.array([0.0, 1.0]), np.array([[0, 1]]), np.array([0, -1])], ids=str)
def test_partition_rejects_bad_labels(y: np.ndarray) -> None:
    with pytest.raises(ValueError, match="labels"):
        partition(y, 1)


def test_dirichlet_gives_up_with_a_clear_message() -> None:
    y = np.repeat(np.arange(2), 50)
    with pytest.raises(ValueError, match="raise alpha"):
        partition_dirichlet(y, 20, 0.001, np.random.default_rng(0), min_size=4)
    with pytest.raises(ValueError, match="cannot give each"):
        partition_dirichlet(y, 20, 1.0, np.random.default_rng(0), min_size=6)


def test_label_histogram_counts() -> None:
    y = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    np.testing.assert_array_equal(label_histogram(y, parts, 4), [[1, 1, 0, 0], [0, 1, 3, 0]])
    with pytest.raises(ValueError, match="num_classes"):
        label_histogram(y, parts, 2)


def test_write_shards_are_loadable_on_device(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 1, 4, 4))  # float64 in, float32 out
    y = _labels(30, 3, seed=5)
    parts = partition(y, 4, "dirichlet", alpha=0.5, seed=3)
    out = tmp_path / "shards" / "run1"
    paths = write_shards(x, y, parts, out)
    assert paths == [out / f"dev-{i}.npz" for i in range(4)]
    for path, idx in zip(paths, parts, strict=True):
        xs, ys = load_shard(path)
        np.testing.assert_array_equal(xs, x[idx].astype(np.float32))
        np.testing.assert_array_equal(ys, y[idx])
    index = json.loads((out / "shards.json").read_text())
    assert list(index) == ["dev-0", "dev-1", "dev-2", "dev-3"]
    for i, idx in enumerate(parts):
        entry = index[f"dev-{i}"]
        assert entry["path"] == f"dev-{i}.npz" and entry["samples"] == len(idx)
        labels, counts = np.unique(y[idx], return_counts=True)
        assert entry["label_counts"] == {str(k): int(c) for k, c in zip(labels, counts,
                                                                         strict=True)}
        assert sum(entry["label_counts"].values()) == len(idx)


def test_write_shards_prefix(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1])
    paths = write_shards(np.zeros((4, 2)), y, [np.array([0, 1]), np.array([2, 3])], tmp_path,
                         prefix="pi-")
    assert [p.name for p in paths] == ["pi-0.npz", "pi-1.npz"]
    assert set(json.loads((tmp_path / "shards.json").read_text())) == {"pi-0", "pi-1"}


@pytest.mark.parametrize(
    ("parts", "match"),
    [([np.array([0, 1]), np.array([], dtype=np.int64)], "empty"),
     ([np.array([0, 4])], "outside"),
     ([np.array([0.0, 1.0])], "integer index")],
)
def test_write_shards_rejects_bad_parts(tmp_path: Path, parts: list[np.ndarray],
                                        match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_shards(np.zeros((4, 2)), np.zeros(4, np.int64), parts, tmp_path)


def test_write_shards_rejects_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 samples but y has 4"):
        write_shards(np.zeros((3, 2)), np.zeros(4, np.int64), [np.array([0])], tmp_path)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200),
    n_devices=st.integers(1, 12),
    k=st.integers(1, 6),
    alpha=st.floats(0.05, 50.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_scheme_is_an_exact_cover(n: int, n_devices: int, k: int, alpha: float,
                                        seed: int) -> None:
    assume(n_devices <= n)
    y = np.random.default_rng(seed).integers(0, k, n)
    for scheme in ("iid", "dirichlet"):
        try:
            parts = partition(y, n_devices, scheme, alpha=alpha, seed=seed)
        except ValueError as exc:  # tiny alpha, few classes: giving up is the documented answer
            assert scheme == "dirichlet" and "raise alpha" in str(exc)
            continue
        assert len(parts) == n_devices and min(len(p) for p in parts) >= 1
        _assert_exact_cover(parts, n)
