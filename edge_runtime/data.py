"""A device's local data: one shard file and a seeded minibatch sampler.

Numpy only, because this runs on the board. A shard is an ``.npz`` written by
``heron devices partition`` with two arrays::

    x   (N, ...) numeric, e.g. (N, C, H, W) already normalised by the server's loader,
                 or int64 (N, 2, L) token ids and attention mask for text models
    y   (N,)     integer labels >= 0

int64 x is kept as int64 (the graph's input is int64 then); any other dtype becomes float32.

It is loaded with ``allow_pickle=False``: a shard is data, never code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

SHARD_KEYS = ("x", "y")
_HELP = "help: make shards with `heron devices partition`"


class ShardError(ValueError):
    """A shard file is missing or does not hold usable training data."""


def load_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a shard so that a bad file fails at start-up, not mid-round."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist; {_HELP}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ShardError(f"shard {path} is a single .npy array, not an .npz archive "
                             f"with keys x and y; {_HELP}")
        with archive:
            missing = [k for k in SHARD_KEYS if k not in archive.files]
            if missing:
                raise ShardError(f"shard {path} lacks key(s) {', '.join(missing)} (has: "
                                 f"{', '.join(archive.files) or 'nothing'}); {_HELP}")
            x_raw = archive["x"]
            y_raw = archive["y"]
    except ShardError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ShardError(f"shard {path} is not a readable .npz archive ({exc}); {_HELP}") from exc
    return _check_arrays(path, x_raw, y_raw)


def _check_arrays(
    path: Path, x_raw: np.ndarray, y_raw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if x_raw.ndim < 2:
        raise ShardError(f"shard {path}: x has shape {x_raw.shape}, expected (N, ...) with "
                         "at least one feature axis")
    if not (np.issubdtype(x_raw.dtype, np.integer) or np.issubdtype(x_raw.dtype, np.floating)):
        raise ShardError(f"shard {path}: x has dtype {x_raw.dtype}, expected a real number type")
    if y_raw.ndim != 1:
        raise ShardError(f"shard {path}: y has shape {y_raw.shape}, expected (N,)")
    if not np.issubdtype(y_raw.dtype, np.integer):
        raise ShardError(f"shard {path}: y has dtype {y_raw.dtype}, expected integer labels")
    if x_raw.shape[0] != y_raw.shape[0]:
        raise ShardError(f"shard {path}: x has {x_raw.shape[0]} samples but y has "
                         f"{y_raw.shape[0]} labels")
    if y_raw.shape[0] == 0:
        raise ShardError(f"shard {path} holds no samples; {_HELP} with fewer devices")
    if x_raw.dtype == np.int64:  # token ids: exact integers, nothing to normalise or check
        x = np.ascontiguousarray(x_raw)
    else:
        with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
            x = np.ascontiguousarray(x_raw, dtype=np.float32)
    if x.dtype == np.float32 and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ShardError(f"shard {path}: x contains {bad} NaN/Inf value(s) (after float32 cast)")
    y = np.ascontiguousarray(y_raw, dtype=np.int64)
    if (y < 0).any():
        raise ShardError(f"shard {path}: y contains negative labels (min {int(y.min())})")
    return x, y


class BatchSampler:
    """Epoch-shuffled minibatch indices from an explicit generator.

    Each epoch is a fresh permutation of ``range(n)`` cut into consecutive batches, so every
    index appears exactly once per epoch. The last batch of an epoch is smaller when
    ``batch_size`` does not divide ``n`` (no wrap-around: an epoch never borrows from the next,
    and no sample is dropped). With ``n < batch_size`` every batch is all ``n`` indices.
    The same generator state gives the same sequence of batches, on any device.
    """

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator) -> None:
        if n < 1:
            raise ValueError(f"BatchSampler needs n >= 1 samples, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._n = int(n)
        self._batch_size = int(batch_size)
        self._rng = rng
        self._order = np.empty(0, dtype=np.int64)
        self._pos = 0
        self._epoch = -1

    @property
    def epoch(self) -> int:
        """Index of the epoch the last batch came from (-1 before the first batch)."""
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        return -(-self._n // self._batch_size)

    def next_indices(self) -> np.ndarray:
        """The next batch; a copy, so callers may keep or modify it."""
        if self._pos >= self._order.shape[0]:
            self._order = self._rng.permutation(self._n).astype(np.int64, copy=False)
            self._pos = 0
            self._epoch += 1
        batch = self._order[self._pos:self._pos + self._batch_size].copy()
        self._pos += batch.shape[0]
        return batch
