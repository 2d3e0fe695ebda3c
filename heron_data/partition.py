"""Split a training set across devices, and write one shard file per device.

Pure functions over index arrays with an explicit generator, so a partition is reproduced
exactly from its seed. Shards are written in the format ``edge_runtime.data.load_shard``
reads; ``shards.json`` records what each device got, for reports and for picking a shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

SCHEMES = ("iid", "dirichlet")
SHARDS_INDEX = "shards.json"
MAX_DIRICHLET_TRIES = 1000


def partition_iid(n: int, n_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random, equal-as-possible shares: the baseline the non-IID split is judged by.

    Each array is sorted (order within a shard carries no meaning; devices shuffle).
    """
    _check_counts(n, n_devices)
    order = rng.permutation(n).astype(np.int64, copy=False)
    return [np.sort(part) for part in np.array_split(order, n_devices)]


def partition_dirichlet(
    y: np.ndarray,
    n_devices: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label skew: each class is split across devices with proportions ~ Dirichlet(alpha).

    The per-class form of the Dirichlet non-IID split (Hsu et al. 2019) used by most FL
    benchmarks. Small alpha puts most of a class on few devices; large alpha approaches IID.
    The whole draw is repeated until every device has ``min_size`` samples, up to
    ``MAX_DIRICHLET_TRIES`` times.
    """
    y = _check_labels(y)
    _check_counts(y.shape[0], n_devices)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size * n_devices > y.shape[0]:
        raise ValueError(f"cannot give each of {n_devices} devices {min_size} samples out of "
                         f"{y.shape[0]}; help: use fewer devices or a smaller min_size")
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    smallest = 0
    for _ in range(MAX_DIRICHLET_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            props = rng.dirichlet(np.full(n_devices, alpha))
            if not np.isfinite(props).all():  # underflow at tiny alpha: redraw the class
                props = np.zeros(n_devices)
                props[rng.integers(n_devices)] = 1.0
            cuts = (np.cumsum(props)[:-1] * shuffled.shape[0]).astype(np.int64)
            for bucket, piece in zip(buckets, np.split(shuffled, cuts), strict=True):
                bucket.append(piece)
        parts = [np.sort(np.concatenate(b)).astype(np.int64, copy=False) for b in buckets]
        smallest = min(p.shape[0] for p in parts)
        if smallest >= min_size:
            return parts
    raise ValueError(
        f"Dirichlet split with alpha={alpha} left a device with fewer than {min_size} samples "
        f"in {MAX_DIRICHLET_TRIES} draws (smallest last time: {smallest}); help: raise alpha, "
        "use fewer devices, or lower min_size")


def partition(
    y: np.ndarray,
    n_devices: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Validate the request once, then dispatch; ``alpha`` is used by ``dirichlet`` only."""
    y = _check_labels(y)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    _check_counts(y.shape[0], n_devices)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return partition_iid(y.shape[0], n_devices, rng)
    return partition_dirichlet(y, n_devices, alpha, rng)


def label_histogram(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Samples per (device, class), to show how skewed a partition is."""
    y = _check_labels(y)
    if y.size and int(y.max()) >= num_classes:
        raise ValueError(f"label {int(y.max())} does not fit num_classes={num_classes}")
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, idx in enumerate(parts):
        out[i] = np.bincount(y[idx], minlength=num_classes)
    return out


def write_shards(
    x: np.ndarray,
    y: np.ndarray,
    parts: list[np.ndarray],
    out_dir: str | Path,
    *,
    prefix: str = "dev-",
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``{prefix}{i}.npz`` per device plus ``shards.json``; the file stem is the device id.
    ``progress(done, total)`` is called after each shard (thousands of shards take minutes).

    Empty parts are refused, because a device could not load them.
    """
    y = _check_labels(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    for i, idx in enumerate(parts):
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"part {i} must be a 1-D integer index array")
        if idx.size == 0:
            raise ValueError(f"part {i} is empty; help: use fewer devices or a larger alpha")
        if idx.min() < 0 or idx.max() >= y.shape[0]:
            raise ValueError(f"part {i} has indices outside 0..{y.shape[0] - 1}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    index: dict[str, dict[str, object]] = {}
    for i, idx in enumerate(parts):
        device_id = f"{prefix}{i}"
        path = out / f"{device_id}.npz"
        y_part = np.ascontiguousarray(y[idx], dtype=np.int64)
        # token ids stay int64 (text models); everything else is float32 features
        dtype = np.int64 if x.dtype == np.int64 else np.float32
        np.savez(path, x=np.ascontiguousarray(x[idx], dtype=dtype), y=y_part)
        labels, counts = np.unique(y_part, return_counts=True)
        index[device_id] = {
            "path": path.name,
            "samples": int(idx.shape[0]),
            "label_counts": {str(int(lbl)): int(c) for lbl, c in zip(labels, counts, strict=True)},
        }
        paths.append(path)
        if progress is not None:
            progress(i + 1, len(parts))
    (out / SHARDS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _check_counts(n: int, n_devices: int) -> None:
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if n_devices > n:
        raise ValueError(f"cannot split {n} samples across {n_devices} devices; help: use at "
                         f"most {n} devices")


def _check_labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {y.shape} and dtype "
                         f"{y.dtype}")
    if y.size and int(y.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(y.min())}")
    return y
