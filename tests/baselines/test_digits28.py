"""digits-28: the MNIST-format data set the accuracy bench generates."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from baselines.digits28 import make_digits28
from heron_data.datasets import load_dataset


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
