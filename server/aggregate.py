"""Round planning and aggregation: pure functions, tested without a broker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WEIGHTINGS = ("samples", "uniform")


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


def check_update(weights: np.ndarray, expected_size: int,
                 max_norm: float | None = None) -> str | None:
    """Why an uploaded weight vector must not be averaged, or None if it may."""
    if weights.dtype != np.float32:
        return f"weights have dtype {weights.dtype}, expected float32"
    if weights.shape != (expected_size,):
        return f"weights have shape {weights.shape}, expected ({expected_size},)"
    if not np.all(np.isfinite(weights)):
        return "weights contain NaN or Inf"
    if max_norm is not None and float(np.linalg.norm(weights)) > max_norm:
        return f"weight norm {float(np.linalg.norm(weights)):.3g} exceeds the bound {max_norm}"
    return None


def aggregate(updates: Sequence[DeviceUpdate], weighting: str = "samples") -> np.ndarray:
    """FedAvg of device weights: by sample count (CSE-FSL) or uniform (the paper)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "samples":
        w = np.asarray([u.num_samples for u in updates], dtype=np.float64)
        if np.any(w <= 0):
            raise ValueError("sample-weighted averaging needs positive sample counts")
    else:
        w = np.ones(len(updates), dtype=np.float64)
    shapes = {u.weights.shape for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"updates have different shapes {sorted(shapes)}; cannot average")
    w /= w.sum()
    out = np.zeros_like(updates[0].weights, dtype=np.float64)
    for wi, u in zip(w, updates, strict=True):
        out += wi * u.weights
    return out.astype(np.float32)
