"""Dataset loaders return exactly the pixels on disk, normalised, and refuse bad files."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from heron_data.datasets import DATASETS, DatasetError, load_dataset
from heron_data.images import CIFAR10_MEAN, CIFAR10_STD, CIFAR10_SUBDIR, MNIST_MEAN, MNIST_STD

# --- helpers --------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x00000800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _make_mnist(
    root: Path, *, gz: bool = False, dotted: bool = False, n_train: int = 20, n_test: int = 10
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train-labels"][:10] = np.arange(10)  # every class present: num_classes is 10
    for stem, array in arrays.items():
        sep = "." if dotted else "-"
        name = f"{stem}{sep}idx{array.ndim}-ubyte" + (".gz" if gz else "")
        _write_idx(root / name, array, gz=gz)
    return arrays


def _denorm_mnist(x: np.ndarray) -> np.ndarray:
    return np.rint((x[:, 0] * MNIST_STD + MNIST_MEAN) * 255.0).astype(np.uint8)


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes and str as Python 2 ``str`` (BINSTRING), like the real CIFAR-10 batches.

    The stock protocol-2 pickler would route bytes through ``_codecs.encode``, which real
    Python 2 files never reference.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _py2_pickle(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    # Python 2 era numpy lived at numpy.core; GLOBAL opcodes are newline-terminated text.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _cifar_batch(n: int, rng: np.random.Generator) -> dict[bytes, Any]:
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _make_cifar(root: Path, *, py2: bool = True, n: int = 4) -> dict[str, dict[bytes, Any]]:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = _cifar_batch(n, rng)
        blob = _py2_pickle(batch) if py2 else pickle.dumps(batch, protocol=4)
        (root / name).write_bytes(blob)
        batches[name] = batch
    return batches


def _denorm_cifar(x: np.ndarray) -> np.ndarray:
    mean = np.asarray(CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD).reshape(1, 3, 1, 1)
    return np.rint((x * std + mean) * 255.0).astype(np.uint8)


def _check_contract(ds: Any) -> None:
    for a, dtype in ((ds.x_train, np.float32), (ds.y_train, np.int64),
                     (ds.x_test, np.float32), (ds.y_test, np.int64)):
        assert a.dtype == dtype and a.flags.c_contiguous


# --- names and arguments --------------------------------------------------------------------


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(DatasetError, match="known: digits, mnist, cifar10, npz, tsv, sst2"):
        load_dataset("imagenet")
    assert DATASETS == ("digits", "mnist", "cifar10", "npz", "tsv", "sst2")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "npz"])
def test_file_datasets_require_data_dir(name: str) -> None:
    with pytest.raises(DatasetError, match="--data-dir is required"):
        load_dataset(name)


def test_nonexistent_data_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")


# --- digits ---------------------------------------------------------------------------------


def test_digits_shapes_classes_and_normalisation() -> None:
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
    assert ds.x_test.shape[0] == pytest.approx(0.2 * 1797, abs=1)
    _check_contract(ds)
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert float(ds.x_train.std()) == pytest.approx(1, rel=1e-4)
    # stratified: every class in both splits, in about the same proportion
    train_frac = np.bincount(ds.y_train, minlength=10) / ds.y_train.size
    test_frac = np.bincount(ds.y_test, minlength=10) / ds.y_test.size
    assert np.abs(train_frac - test_frac).max() < 0.01


def test_digits_split_is_deterministic_by_seed() -> None:
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset(
        "digits", seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)


def test_digits_test_fraction() -> None:
    ds = load_dataset("digits", test_fraction=0.5)
    assert abs(ds.x_test.shape[0] - ds.x_train.shape[0]) <= 1
    with pytest.raises(DatasetError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)


# --- MNIST idx ------------------------------------------------------------------------------


@pytest.mark.parametrize(("gz", "dotted"), [(False, False), (True, False), (False, True),
                                            (True, True)])
def test_mnist_returns_the_written_pixels_and_labels(tmp_path: Path, gz: bool,
                                                     dotted: bool) -> None:
    arrays = _make_mnist(tmp_path, gz=gz, dotted=dotted)
    ds = load_dataset("mnist", tmp_path)
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    _check_contract(ds)
    np.testing.assert_array_equal(_denorm_mnist(ds.x_train), arrays["train-images"])
    np.testing.assert_array_equal(_denorm_mnist(ds.x_test), arrays["t10k-images"])
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels"])


def test_mnist_missing_files_are_listed_with_dir(tmp_path: Path) -> None:
    _make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg
    assert "t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte" in msg
    assert "train-labels" not in msg


def test_mnist_wrong_magic_names_the_file(tmp_path: Path) -> None:
    _make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[3] = 0x01  # images file now claims to be a labels file
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="magic number 0x00000801") as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)


def test_mnist_swapped_files_are_caught_by_magic(tmp_path: Path) -> None:
    arrays = _make_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["t10k-labels"])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*magic"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated_file_names_the_file(tmp_path: Path, gz: bool) -> None:
    _make_mnist(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    path = tmp_path / f"t10k-images-idx3-ubyte{suffix}"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)


def test_mnist_truncated_header(tmp_path: Path) -> None:
    _make_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", tmp_path)


def test_mnist_image_label_count_mismatch(tmp_path: Path) -> None:
    _make_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(DatasetError, match="20 images but .* 19 labels"):
        load_dataset("mnist", tmp_path)


# --- CIFAR-10 -------------------------------------------------------------------------------


@pytest.mark.parametrize("py2", [True, False])
@pytest.mark.parametrize("subdir", [True, False])
def test_cifar10_returns_the_written_pixels_and_labels(tmp_path: Path, py2: bool,
                                                       subdir: bool) -> None:
    batches = _make_cifar(tmp_path / CIFAR10_SUBDIR if subdir else tmp_path, py2=py2)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    _check_contract(ds)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    raw_train = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(_denorm_cifar(ds.x_train), raw_train)
    np.testing.assert_array_equal(ds.y_train, np.concatenate([b[b"labels"] for b in train]))
    raw_test = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(_denorm_cifar(ds.x_test), raw_test)
    # channel order: the first 1024 values of a row are the red plane
    first = batches["data_batch_1"][b"data"][0]
    np.testing.assert_array_equal(_denorm_cifar(ds.x_train)[0, 0].ravel(), first[:1024])


def test_py2_style_batch_really_uses_the_numpy_core_path(tmp_path: Path) -> None:
    blob = _py2_pickle(_cifar_batch(2, np.random.default_rng(0)))
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in blob and b"_codecs" not in blob


def test_cifar10_missing_files_are_listed(tmp_path: Path) -> None:
    _make_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DatasetError, match="data_batch_3, test_batch") as err:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path) in str(err.value)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("py2", [True, False])
def test_cifar10_malicious_pickle_is_refused_and_not_run(tmp_path: Path, py2: bool) -> None:
    _make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = {b"data": _Exploit(marker), b"labels": [0]}
    blob = _py2_pickle(payload) if py2 else pickle.dumps(payload, protocol=4)
    (tmp_path / "data_batch_2").write_bytes(blob)
    with pytest.raises(DatasetError, match="data_batch_2 refused: global .*system"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar10_refuses_arbitrary_classes(tmp_path: Path) -> None:
    _make_cifar(tmp_path)
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": Path("/")}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(DatasetError, match="not allowed"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_python3_protocol2_gets_a_hint(tmp_path: Path) -> None:
    _make_cifar(tmp_path)
    batch = _cifar_batch(2, np.random.default_rng(0))
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match="_codecs.encode is not allowed.*protocol >= 3"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_garbage_and_wrong_shape(tmp_path: Path) -> None:
    _make_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", tmp_path)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(DatasetError, match=r"expected uint8 \(N, 3072\)"):
        load_dataset("cifar10", tmp_path)


# --- npz ------------------------------------------------------------------------------------


def test_npz_directory_form_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x_tr = rng.normal(size=(6, 2, 4, 4)).astype(np.float32)
    y_tr = np.array([0, 1, 2, 0, 1, 2])
    x_te = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    y_te = np.array([2, 1, 0], dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x_tr, y=y_tr)
    np.savez(tmp_path / "test.npz", x=x_te, y=y_te)
    ds = load_dataset("npz", tmp_path)
    _check_contract(ds)
    assert ds.num_classes == 3 and ds.input_shape == (2, 4, 4)
    np.testing.assert_array_equal(ds.x_train, x_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)


def test_npz_single_file_uint8_hw_gets_channel_and_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x_tr = rng.integers(0, 256, (5, 6, 6), dtype=np.uint8)
    x_te = rng.integers(0, 256, (2, 6, 6), dtype=np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x_tr, y_train=np.arange(5), x_test=x_te, y_test=np.array([4, 6]))
    ds = load_dataset("npz", str(path))
    _check_contract(ds)
    assert ds.input_shape == (1, 6, 6) and ds.num_classes == 7
    np.testing.assert_allclose(ds.x_train[:, 0], x_tr / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ds.y_test, [4, 6])


def test_npz_missing_files_and_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 3)), y=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match="test.npz"):
        load_dataset("npz", tmp_path)
    path = tmp_path / "one.npz"
    np.savez(path, x_train=np.zeros((2, 3)), y_train=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match="lacks key.*x_test, y_test"):
        load_dataset("npz", path)


@pytest.mark.parametrize(
    ("y_train", "match"),
    [(np.array([0.0, 1.0]), "integer labels"), (np.array([0, -1]), "negative"),
     (np.array([0, 1, 1]), "2 samples but y has 3")],
)
def test_npz_bad_labels(tmp_path: Path, y_train: np.ndarray, match: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((2, 3)), y_train=y_train, x_test=np.zeros((1, 3)),
             y_test=np.zeros(1, np.int64))
    with pytest.raises(DatasetError, match=match):
        load_dataset("npz", path)


def test_npz_non_finite_and_object_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    x = np.zeros((2, 3))
    x[0, 0] = np.nan
    np.savez(path, x_train=x, y_train=np.zeros(2, np.int64), x_test=np.zeros((1, 3)),
             y_test=np.zeros(1, np.int64))
    with pytest.raises(DatasetError, match="NaN/Inf"):
        load_dataset("npz", path)
    np.savez(path, x_train=np.array([[object()]] * 2, dtype=object), y_train=np.zeros(2, int),
             x_test=np.zeros((1, 1)), y_test=np.zeros(1, np.int64))
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset("npz", path)


# --- class count ----------------------------------------------------------------------------


def test_a_huge_label_is_refused_before_it_sizes_the_classifier(tmp_path: Path) -> None:
    x = np.zeros((3, 4, 4), np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x, y_train=np.array([0, 1, 10**9]), x_test=x[:1],
             y_test=np.array([1]))
    with pytest.raises(DatasetError, match=r"label 1000000000 .*K <= 10000.*remap"):
        load_dataset("npz", str(path))


def test_the_class_bound_is_inclusive(tmp_path: Path) -> None:
    from heron_data.datasets import MAX_CLASSES

    x = np.zeros((2, 4, 4), np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x, y_train=np.array([0, MAX_CLASSES - 1]), x_test=x[:1],
             y_test=np.array([0]))
    assert load_dataset("npz", str(path)).num_classes == MAX_CLASSES


def test_a_dataset_record_checks_its_labels_against_its_class_count() -> None:
    from heron_data.datasets import Dataset

    x = np.zeros((2, 1, 2, 2), np.float32)
    with pytest.raises(DatasetError, match="outside 0..1"):
        Dataset("d", x, np.array([0, 2]), x, np.array([0, 1]), 2)
    with pytest.raises(DatasetError, match="K <= 10000"):
        Dataset("d", x, np.array([0, 1]), x, np.array([0, 1]), 10**9)
