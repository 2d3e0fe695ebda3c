"""Data sets in users' standard formats that need no download, for the accuracy bench.

digits-28: sklearn's 8x8 digits drawn MNIST-style and written as the four MNIST idx files;
digits-32c: the same digits drawn in colour on 32x32x3 and written as CIFAR-10's python
batches. The loaders a user's real MNIST and CIFAR-10 go through then run on every machine.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

MNIST_FORMAT = "mnist-format"  # a data set in MNIST's idx files: real MNIST, or digits-28
CIFAR_FORMAT = "cifar-format"  # CIFAR-10's python batches: real CIFAR-10, or digits-32c


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as MNIST ships them (big-endian dims, unsigned bytes)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.tobytes())


def _resize(imgs: np.ndarray, side: int) -> np.ndarray:
    """(n, 8, 8) -> (n, side, side) by linear interpolation along each axis."""
    grid = np.linspace(0, 7, side)
    lo = np.floor(grid).astype(int)
    hi = np.minimum(lo + 1, 7)
    w = grid - lo
    rows = imgs[:, lo, :] * (1 - w)[None, :, None] + imgs[:, hi, :] * w[None, :, None]
    return rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]


def _split(n: int, rng: np.random.Generator, test_fraction: float
           ) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]


def make_digits28(out: Path, seed: int = 0, test_fraction: float = 0.25) -> Path:
    """sklearn's 8x8 digits drawn MNIST-style: 28x28 uint8, the digit in a 20x20 box placed
    with a random shift, written as the four MNIST idx files. A different input resolution
    and layout than `digits`, exercising the same loader a user's real MNIST goes through."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    imgs = d.images / 16.0  # (n, 8, 8) in [0, 1]
    n = len(imgs)
    big = _resize(imgs, 20)
    canvas = np.zeros((n, 28, 28), np.float64)
    shifts = rng.integers(0, 9, size=(n, 2))  # top-left corner within 0..8
    for i in range(n):
        r, c = shifts[i]
        canvas[i, r:r + 20, c:c + 20] = big[i]
    images = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    train, test = _split(n, rng, test_fraction)
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / "train-images-idx3-ubyte", images[train])
    write_idx(out / "train-labels-idx1-ubyte", d.target[train])
    write_idx(out / "t10k-images-idx3-ubyte", images[test])
    write_idx(out / "t10k-labels-idx1-ubyte", d.target[test])
    return out


def make_digits32c(out: Path, seed: int = 0, test_fraction: float = 0.25) -> Path:
    """sklearn's 8x8 digits drawn CIFAR-style: a 24x24 digit at a random shift on 32x32, in a
    random colour over a random background colour with pixel noise, written as CIFAR-10's
    python batches (`data_batch_1..5`, `test_batch`: pickled dicts of b'data' uint8
    (N, 3072) channel-major and b'labels'). Three channels whose colours carry no label make
    the stem learn something the grey digits do not ask of it."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    n = len(d.images)
    big = _resize(d.images / 16.0, 24)  # (n, 24, 24) in [0, 1]: the digit's ink
    fg = rng.uniform(0.0, 1.0, size=(n, 3))
    bg = rng.uniform(0.0, 1.0, size=(n, 3))
    weak = np.abs(fg - bg).max(axis=1) < 0.4  # too little contrast: push the ink away
    fg[weak] = np.where(bg[weak] > 0.5, bg[weak] - 0.5, bg[weak] + 0.5)
    ink = np.zeros((n, 32, 32))
    shifts = rng.integers(0, 9, size=(n, 2))
    for i in range(n):
        r, c = shifts[i]
        ink[i, r:r + 24, c:c + 24] = big[i]
    canvas = (bg[:, :, None, None] * (1 - ink[:, None]) + fg[:, :, None, None] * ink[:, None]
              + rng.normal(0.0, 0.05, size=(n, 3, 32, 32)))
    images = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8).reshape(n, 3072)
    train, test = _split(n, rng, test_fraction)
    out.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(train, 5)
    for i, idx in enumerate(parts, start=1):
        _write_cifar(out / f"data_batch_{i}", images[idx], d.target[idx],
                     f"training batch {i} of 5")
    _write_cifar(out / "test_batch", images[test], d.target[test], "testing batch 1 of 1")
    return out


def _write_cifar(path: Path, data: np.ndarray, labels: np.ndarray, name: str) -> None:
    """One CIFAR-10 python batch: a pickled dict with bytes keys, as the 'python version' of
    CIFAR-10 ships them (pickle protocol 4: Python 3 writes protocol-2 bytes through
    `_codecs.encode`, which the loader's numpy-only unpickler refuses)."""
    batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
             b"data": np.ascontiguousarray(data, dtype=np.uint8),
             b"filenames": [f"digit_{i}.png".encode() for i in range(len(labels))]}
    path.write_bytes(pickle.dumps(batch, protocol=4))
