"""digits-28 and digits-32c: the MNIST- and CIFAR-format data sets the benches generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from baselines.generated_data import make_digits28, make_digits32c
from heron_data.datasets import load_dataset
from heron_data.images import CIFAR10_MEAN, CIFAR10_STD


def test_digits28_is_read_by_the_mnist_loader(tmp_path: Path) -> None:
    root = make_digits28(tmp_path / "d28", seed=1)
    ds = load_dataset("mnist", str(root), seed=0)
    assert ds.input_shape == (1, 28, 28)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert set(np.unique(ds.y_train)) == set(range(10))
    # the digit sits somewhere inside the canvas, with empty margins around it
    raw = (root / "train-images-idx3-ubyte").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert ds.x_train.std() > 0


def test_digits32c_is_read_by_the_cifar10_loader_and_keeps_the_digits(tmp_path: Path) -> None:
    root = make_digits32c(tmp_path / "d32c", seed=1)
    assert sorted(p.name for p in root.iterdir()) == [
        *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    ds = load_dataset("cifar10", str(root), seed=0)
    assert ds.input_shape == (3, 32, 32)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert set(np.unique(ds.y_train)) == set(range(10))
    # the colours differ per image, so the three channels are not one grey picture
    assert not np.allclose(ds.x_train[:, 0], ds.x_train[:, 1])
    # every image carries its digit: ink differs from background by the enforced contrast
    # (>= 0.4 of the range on one channel) less the noise, far above the noise alone
    pix = (ds.x_train * np.asarray(CIFAR10_STD).reshape(1, 3, 1, 1)
           + np.asarray(CIFAR10_MEAN).reshape(1, 3, 1, 1))
    spread = (np.percentile(pix, 99, axis=(2, 3)) - np.percentile(pix, 1, axis=(2, 3)))
    assert (spread.max(axis=1) > 0.3).all()
    # a seed is the same data set; another seed another one
    again = make_digits32c(tmp_path / "again", seed=1)
    assert (again / "test_batch").read_bytes() == (root / "test_batch").read_bytes()
    other = make_digits32c(tmp_path / "other", seed=2)
    assert (other / "test_batch").read_bytes() != (root / "test_batch").read_bytes()
