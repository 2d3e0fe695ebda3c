"""Round planning and aggregation: pure functions, tested without a broker.

`mean` is FedAvg. `median` (coordinate-wise) and `trimmed-mean` (coordinate-wise, the
`trim` fraction of values dropped at each end, as `scipy.stats.trim_mean`) bound how far
one participant can move the result; they ignore sample counts, so a device cannot buy
weight by declaring samples either. `clip_update` bounds each update's distance from the
global weights before any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WEIGHTINGS = ("samples", "uniform")
AGGREGATES = ("mean", "median", "trimmed-mean")


@dataclass(frozen=True)
class DeviceUpdate:
    device_id: str
    weights: np.ndarray
    num_samples: int


def plan_round(ready: Sequence[str], per_round: int | None, round_idx: int,
               seed: int) -> tuple[str, ...]:
    """Which devices train this round: all ready ones, or a seeded sample of `per_round`."""
    pool = sorted(ready)
    if not pool:
        return ()
    if per_round is None or per_round >= len(pool):
        return tuple(pool)
    if per_round < 1:
        raise ValueError(f"devices per round must be >= 1, got {per_round}")
    rng = np.random.default_rng([seed, round_idx])
    return tuple(sorted(rng.choice(pool, size=per_round, replace=False).tolist()))


def check_update(weights: np.ndarray, expected_size: int) -> str | None:
    """Why an uploaded weight vector must not be averaged, or None if it may."""
    if weights.dtype != np.float32:
        return f"weights have dtype {weights.dtype}, expected float32"
    if weights.shape != (expected_size,):
        return f"weights have shape {weights.shape}, expected ({expected_size},)"
    if not np.all(np.isfinite(weights)):
        return "weights contain NaN or Inf"
    return None


def clip_update(weights: np.ndarray, reference: np.ndarray,
                max_norm: float) -> tuple[np.ndarray, float]:
    """`weights` moved back towards `reference` so that |weights - reference| <= max_norm
    (L2); returns the result and the distance before clipping."""
    if not max_norm > 0:
        raise ValueError(f"a norm bound must be > 0, got {max_norm}")
    delta = weights.astype(np.float64) - reference.astype(np.float64)
    norm = float(np.linalg.norm(delta))
    if norm <= max_norm:
        return weights, norm
    return (reference + delta * (max_norm / norm)).astype(np.float32), norm


def trimmed_count(n: int, trim: float) -> int:
    """Values dropped at each end of n by a trimmed mean (rounded down, as scipy does)."""
    check_trim(trim)
    return int(np.floor(trim * n))


def check_trim(trim: float) -> None:
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"--trim is the fraction cut at each end and must be in [0, 0.5), "
                         f"got {trim}")


def aggregate(updates: Sequence[DeviceUpdate], weighting: str = "samples",
              method: str = "mean", trim: float = 0.2) -> np.ndarray:
    """The round's new global weights from the accepted device updates.

    mean: FedAvg, by sample count (CSE-FSL) or uniform (the paper); median and trimmed-mean:
    coordinate-wise and unweighted (module doc)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    if method not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {method!r}")
    shapes = {u.weights.shape for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"updates have different shapes {sorted(shapes)}; cannot average")
    if method == "mean":
        return _mean(updates, weighting)
    stack = np.stack([u.weights for u in updates]).astype(np.float64)
    if method == "median":
        return np.median(stack, axis=0).astype(np.float32)
    k = trimmed_count(len(updates), trim)
    stack.sort(axis=0)
    return stack[k:len(updates) - k].mean(axis=0).astype(np.float32)


def _mean(updates: Sequence[DeviceUpdate], weighting: str) -> np.ndarray:
    """FedAvg of device weights: by sample count (CSE-FSL) or uniform (the paper)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "samples":
        w = np.asarray([u.num_samples for u in updates], dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError("sample-weighted averaging needs positive, finite sample counts")
    else:
        w = np.ones(len(updates), dtype=np.float64)
    w /= w.sum()
    out = np.zeros_like(updates[0].weights, dtype=np.float64)
    for wi, u in zip(w, updates, strict=True):
        out += wi * u.weights
    return out.astype(np.float32)
