"""digits-28: an MNIST-format data set that needs no download, for the accuracy bench.

sklearn's 8x8 digits drawn MNIST-style and written as the four MNIST idx files, so the
loader a user's real MNIST goes through runs on every machine.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MNIST_FORMAT = "mnist-format"  # a data set in MNIST's idx files: real MNIST, or digits-28


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as MNIST ships them (big-endian dims, unsigned bytes)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.tobytes())


def make_digits28(out: Path, seed: int = 0, test_fraction: float = 0.25) -> Path:
    """sklearn's 8x8 digits drawn MNIST-style: 28x28 uint8, the digit in a 20x20 box placed
    with a random shift, written as the four MNIST idx files. A different input resolution
    and layout than `digits`, exercising the same loader a user's real MNIST goes through."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    imgs = d.images / 16.0  # (n, 8, 8) in [0, 1]
    n = len(imgs)
    # 8 -> 20 by linear interpolation along each axis
    grid = np.linspace(0, 7, 20)
    lo = np.floor(grid).astype(int)
    hi = np.minimum(lo + 1, 7)
    w = grid - lo
    rows = imgs[:, lo, :] * (1 - w)[None, :, None] + imgs[:, hi, :] * w[None, :, None]
    big = rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]
    canvas = np.zeros((n, 28, 28), np.float64)
    shifts = rng.integers(0, 9, size=(n, 2))  # top-left corner within 0..8
    for i in range(n):
        r, c = shifts[i]
        canvas[i, r:r + 20, c:c + 20] = big[i]
    images = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    order = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / "train-images-idx3-ubyte", images[train])
    write_idx(out / "train-labels-idx1-ubyte", d.target[train])
    write_idx(out / "t10k-images-idx3-ubyte", images[test])
    write_idx(out / "t10k-labels-idx1-ubyte", d.target[test])
    return out
