"""Shard loading rejects bad files with a clear error; the sampler is seeded and complete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.data import BatchSampler, ShardError, load_shard


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_load_shard_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 1, 8, 8))  # float64 on disk: loaded as float32
    y = np.array([0, 1, 2, 3, 4, 5, 9], dtype=np.int32)
    path = _write(tmp_path / "dev-0.npz", x=x, y=y)
    x2, y2 = load_shard(path)
    assert x2.dtype == np.float32 and x2.flags.c_contiguous and x2.shape == (7, 1, 8, 8)
    assert y2.dtype == np.int64 and y2.flags.c_contiguous
    np.testing.assert_array_equal(x2, x.astype(np.float32))
    np.testing.assert_array_equal(y2, y)


def test_load_shard_accepts_str_path_and_flat_features(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.npz", x=np.ones((3, 5), np.float32), y=np.zeros(3, np.int64))
    x, y = load_shard(str(path))
    assert x.shape == (3, 5) and y.shape == (3,)


def test_int64_token_shards_stay_int64_other_integers_become_float32(tmp_path: Path) -> None:
    tokens = np.array([[[101, 2023, 102, 0], [1, 1, 1, 0]]] * 3, dtype=np.int64)
    x, _ = load_shard(_write(tmp_path / "t.npz", x=tokens, y=np.zeros(3, np.int64)))
    assert x.dtype == np.int64 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, tokens)
    pixels = np.full((2, 1, 2, 2), 7, dtype=np.uint8)
    x, _ = load_shard(_write(tmp_path / "p.npz", x=pixels, y=np.zeros(2, np.int64)))
    assert x.dtype == np.float32


def test_missing_file_names_path_and_how_to_make_shards(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(ShardError, match="heron devices partition") as err:
        load_shard(path)
    assert str(path) in str(err.value)


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.npz", x=np.ones((3, 2), np.float32))
    with pytest.raises(ShardError, match=r"lacks key\(s\) y"):
        load_shard(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_x_is_refused(tmp_path: Path, bad: float) -> None:
    x = np.ones((4, 2), np.float32)
    x[2, 1] = bad
    path = _write(tmp_path / "s.npz", x=x, y=np.zeros(4, np.int64))
    with pytest.raises(ShardError, match="NaN/Inf"):
        load_shard(path)


def test_float64_overflowing_float32_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.npz", x=np.full((2, 2), 1e300), y=np.zeros(2, np.int64))
    with pytest.raises(ShardError, match="NaN/Inf"):
        load_shard(path)


def test_mismatched_sample_count_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.npz", x=np.ones((4, 2), np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(ShardError, match="4 samples but y has 3"):
        load_shard(path)


def test_empty_shard_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.npz", x=np.ones((0, 2), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(ShardError, match="no samples"):
        load_shard(path)


def test_negative_labels_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.npz", x=np.ones((2, 2), np.float32), y=np.array([0, -1]))
    with pytest.raises(ShardError, match="negative"):
        load_shard(path)


def test_float_labels_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.npz", x=np.ones((2, 2), np.float32), y=np.array([0.0, 1.0]))
    with pytest.raises(ShardError, match="integer labels"):
        load_shard(path)


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(ShardError, match=str(path)):
        load_shard(path)


def test_pickled_object_arrays_are_not_loaded(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.npz", x=np.array([[{"a": 1}]], dtype=object), y=np.zeros(1))
    with pytest.raises(ShardError):
        load_shard(path)


def _epochs(sampler: BatchSampler, n_batches: int) -> list[np.ndarray]:
    return [sampler.next_indices() for _ in range(n_batches)]


def test_sampler_is_deterministic_for_a_seed() -> None:
    a = _epochs(BatchSampler(10, 3, np.random.default_rng(42)), 12)
    b = _epochs(BatchSampler(10, 3, np.random.default_rng(42)), 12)
    c = _epochs(BatchSampler(10, 3, np.random.default_rng(43)), 12)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (12, 4), (5, 1), (7, 7)])
def test_sampler_covers_every_index_once_per_epoch(n: int, batch_size: int) -> None:
    sampler = BatchSampler(n, batch_size, np.random.default_rng(0))
    per_epoch = -(-n // batch_size)
    assert sampler.batches_per_epoch == per_epoch
    orders = []
    for epoch in range(3):
        batches = _epochs(sampler, per_epoch)
        assert sampler.epoch == epoch
        assert all(len(b) == batch_size for b in batches[:-1])
        assert 1 <= len(batches[-1]) <= batch_size
        order = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
        orders.append(order)
    if n > 3:
        assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch


def test_sampler_with_fewer_samples_than_batch_returns_all() -> None:
    sampler = BatchSampler(3, 8, np.random.default_rng(0))
    for _ in range(4):
        np.testing.assert_array_equal(np.sort(sampler.next_indices()), np.arange(3))


def test_sampler_batches_are_copies() -> None:
    sampler = BatchSampler(6, 3, np.random.default_rng(0))
    first = sampler.next_indices()
    first[:] = -1
    assert (sampler.next_indices() >= 0).all()


@pytest.mark.parametrize(("n", "batch_size"), [(0, 4), (4, 0), (-1, 1)])
def test_sampler_rejects_bad_sizes(n: int, batch_size: int) -> None:
    with pytest.raises(ValueError):
        BatchSampler(n, batch_size, np.random.default_rng(0))
