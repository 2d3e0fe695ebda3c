"""What a run leaves on disk: metrics.jsonl, summary.json and checkpoints.

Every write either completes or leaves the previous file as it was: whole files go to a temp
file that is fsynced and renamed over the old one; a metrics line is appended and, if the
append fails, cut off again. A failed write (a full disk) raises `WriteError`, which names the
file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from edge_runtime.files import atomic_write

# what Server._checkpoint writes; a file without one of them is not a heron checkpoint
CHECKPOINT_KEYS = ("round", "run_id", "device_weights", "server_state", "server_optimizer",
                   "manifest", "train_config", "records", "counters")


class WriteError(OSError):
    """A result file could not be written; its previous contents are intact."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] ...: filename"
        return str(self.args[0])


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, incomplete, or from another run."""


def _write_error(path: Path, exc: OSError) -> WriteError:
    if exc.errno == errno.ENOSPC:
        why = "the disk is full (ENOSPC)"
    elif exc.errno == getattr(errno, "EDQUOT", None):
        why = "the disk quota is exceeded (EDQUOT)"
    else:
        why = f"{exc.strerror or exc}" + (f" ({errno.errorcode.get(exc.errno, exc.errno)})"
                                          if exc.errno else "")
    err = WriteError(f"cannot write {path}: {why}; the file keeps its previous contents; "
                     "help: free space there, then continue with --resume (every completed "
                     "round is in checkpoint.pt)")
    err.errno = exc.errno
    err.filename = str(path)
    return err


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`edge_runtime.files.atomic_write`, with a failure raised as a `WriteError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as exc:
        raise _write_error(path, exc) from exc


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one line and fsync it; if that fails, cut the file back to where it was, so
    it never ends in half a line. (Appending keeps each round's write small, and readers
    that follow the file see one line per round.)"""
    line = (json.dumps(obj) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
                os.fsync(fd)
            if isinstance(exc, OSError):
                raise _write_error(path, exc) from exc
            raise
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """A self-describing checkpoint: round, weights, server state, config and manifest."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint; `CheckpointError` says what is wrong with it."""
    hint = "help: resume from the --out directory of the run that wrote it, or start anew " \
           "with another --out"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} does not exist; {hint}") from exc
    except Exception as exc:  # torch raises several types for a bad file
        raise CheckpointError(f"cannot read {path}: it is damaged or not a heron checkpoint "
                              f"({type(exc).__name__}: {exc}); {hint}") from exc
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a heron checkpoint (no {', '.join(missing)}); "
                              f"{hint}")
    weights, rounds, records = ckpt["device_weights"], ckpt["round"], ckpt["records"]
    if not isinstance(rounds, int) or rounds < 1 or not isinstance(records, list) \
            or len(records) != rounds:
        held = len(records) if isinstance(records, list) else "no"
        raise CheckpointError(f"{path} is inconsistent: round {rounds!r} with {held} round "
                              f"records; {hint}")
    if not isinstance(weights, torch.Tensor) or weights.ndim != 1 or \
            not bool(torch.isfinite(weights).all()):
        raise CheckpointError(f"{path} holds no finite device weight vector; {hint}")
    manifest, train = ckpt["manifest"], ckpt["train_config"]
    if not isinstance(manifest, dict) or not isinstance(train, dict) or \
            not all(isinstance(manifest.get(k), str) for k in ("model", "cut")) or \
            not isinstance(train.get("algorithm"), str):
        raise CheckpointError(f"{path} does not say its model, cut and algorithm; {hint}")
    return ckpt


def check_checkpoint_matches(ckpt: dict[str, Any], path: Path, *, model: str,
                             cut: str | None, algorithm: str) -> None:
    """The options a resumed run starts with must be the ones that wrote the checkpoint
    (`cut` None: the model's default, which only the exporter knows, so it is not checked)."""
    theirs = {"model": ckpt["manifest"]["model"], "cut": ckpt["manifest"]["cut"],
              "algorithm": ckpt["train_config"]["algorithm"]}
    mine = {"model": model, "cut": cut, "algorithm": algorithm}
    wrong = [f"--{k} {theirs[k]} (given: {mine[k]})" for k in theirs
             if mine[k] is not None and mine[k] != theirs[k]]
    if wrong:
        raise CheckpointError(f"{path} was written by a run with {', '.join(wrong)}; help: "
                              "resume with the options of the run that wrote it")
