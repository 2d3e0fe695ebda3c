"""What every loader returns: a validated train/test split, and the error loaders raise.

Every loader validates what it reads and names the file that is wrong, because a
half-parsed dataset fails much later and far from the cause.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Classes a dataset may have: the largest label sizes the classifier (and the device's aux
# head), so a stray label like 10**9 must be an error, not a 10**9-wide output layer.
MAX_CLASSES = 10_000

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


class DatasetError(ValueError):
    """A dataset is unknown, missing, or its files are malformed."""


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Dataset:
    """A train/test split ready for partitioning, y int64.

    x is float32 NCHW normalised for images, or int64 (N, 2, L) token ids and attention
    mask for text. ``x_dev``/``y_dev`` hold an optional held-out split (text ``dev.tsv``)
    that training and the per-round test never touch.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_dev: np.ndarray | None = None
    y_dev: np.ndarray | None = None

    def __post_init__(self) -> None:
        splits = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if (self.x_dev is None) != (self.y_dev is None):
            raise DatasetError(f"{self.name}: x_dev and y_dev must be given together")
        if self.x_dev is not None and self.y_dev is not None:
            splits.append(("dev", self.x_dev, self.y_dev))
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise DatasetError(f"{self.name}: {self.num_classes} classes; labels must be "
                               f"0..K-1 with K <= {MAX_CLASSES}; help: remap the labels")
        for split, x, y in splits:
            if x.dtype not in (np.float32, np.int64) or y.dtype != np.int64:
                raise DatasetError(f"{self.name} {split}: expected x float32 or int64 and y "
                                   f"int64, got {x.dtype} and {y.dtype}")
            if x.dtype != self.x_train.dtype:
                raise DatasetError(f"{self.name} {split}: x is {x.dtype} but train x is "
                                   f"{self.x_train.dtype}")
            if y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise DatasetError(f"{self.name} {split}: x has shape {x.shape} but y has "
                                   f"shape {y.shape}")
            if y.size and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DatasetError(f"{self.name} {split}: labels {int(y.min())}..{int(y.max())}"
                                   f" outside 0..{self.num_classes - 1}")
            if x.shape[1:] != self.x_train.shape[1:]:
                raise DatasetError(f"{self.name}: train samples have shape "
                                   f"{self.x_train.shape[1:]} but {split} samples "
                                   f"{x.shape[1:]}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def input_dtype(self) -> str:
        """"float32" (images) or "int64" (token ids + mask)."""
        return str(self.x_train.dtype)



def class_count(where: object, *labels: np.ndarray) -> int:
    """K for integer labels 0..K-1 (the largest label + 1), bounded by MAX_CLASSES; the
    error names the offending label and where it is."""
    top = max(int(y.max()) for y in labels)
    if top >= MAX_CLASSES:
        raise DatasetError(f"{where}: label {top} would make {top + 1} classes; labels must "
                           f"be 0..K-1 with K <= {MAX_CLASSES}; help: remap the labels to "
                           "consecutive integers from 0")
    return top + 1


def from_arrays(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
    """A Dataset from any-typed arrays: x as float32, y as int64, both contiguous."""

    def c(a: np.ndarray, dtype: type) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=dtype)

    return Dataset(name, c(x_train, np.float32), c(y_train, np.int64), c(x_test, np.float32),
                   c(y_test, np.int64), int(num_classes))

