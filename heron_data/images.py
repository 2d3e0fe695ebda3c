"""Image and array datasets: files on disk to normalised float32 NCHW arrays.

Nothing is downloaded: ``digits`` ships inside scikit-learn, ``mnist`` (also Fashion-MNIST
and KMNIST), ``cifar10`` and ``npz`` read files the user already has (``--data-dir``).

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
from pathlib import Path
from typing import Any

import numpy as np

from heron_data.dataset import Dataset, DatasetError, class_count, from_arrays

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
# Per-channel statistics of the CIFAR-10 training set (pixels scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_SUBDIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


# --- digits ---------------------------------------------------------------------------------

def load_digits(seed: int, test_fraction: float) -> Dataset:
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
    return from_arrays("digits", x_train, y_train, x_test, y_test, 10)


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


def load_mnist(root: Path) -> Dataset:
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
    return from_arrays("mnist", x_train, y_train, x_test, y_test, num_classes)


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


def load_cifar10(root: Path) -> Dataset:
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
    return from_arrays("cifar10", x_train, y_train, to_x(x_test_raw), y_test, 10)


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


def load_npz(root: Path) -> Dataset:
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
    return from_arrays("npz", x_train, y_train, x_test, y_test, num_classes)


