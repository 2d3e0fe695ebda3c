"""What a run leaves on disk: metrics.jsonl, summary.json and checkpoints (what they hold,
and how they are written), and the console line of each round's record.

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
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edge_runtime.files import atomic_write

if TYPE_CHECKING:
    from edge_runtime.manifest import Manifest
    from server.members import Members
    from server.options import ServerOptions
    from server.round_state import RoundState
    from server.traffic import Traffic
    from server.trainer import Evaluation

# what server.loop.Server._checkpoint writes; a file without one is not a heron checkpoint
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


def write_jsonl(path: Path, objs: list[Any]) -> None:
    """A whole metrics file at once (a resumed run's, rebuilt from its checkpoint)."""
    atomic_write_bytes(path, "".join(json.dumps(o) + "\n" for o in objs).encode())


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


def round_record(state: RoundState, ev: Evaluation | None, members: Members, *,
                 traffic: Traffic, since: dict[str, dict[str, int]], seconds: float,
                 times: dict[str, float] | None = None) -> dict[str, Any]:
    """A closed round's line of metrics.jsonl (and of the checkpoint's records); `ev` None:
    not evaluated this round (--eval-every), so the test fields are null; the `*_by_kind`
    counts are the round's (`since` is the traffic when it started)."""
    m, participants = members, state.participants
    this_round = traffic.since(since)
    tel = state.telemetry.values()
    return {
        "round": state.start.round,
        "test_accuracy": ev.accuracy if ev else None,
        "test_loss": ev.loss if ev else None,
        "test_examples": ev.samples if ev else None,
        "server_train_loss": statistics.fmean(state.server_losses)
        if state.server_losses else None,
        "device_local_loss": statistics.fmean(t.loss_mean for t in tel) if tel else None,
        "participants": list(participants),
        "updates": sorted(state.updates),
        # a device asked for its weights that did not answer in time is dropped too
        "dropped": sorted((state.gone | set(state.replay_mismatch)) - set(state.updates)),
        "smashed_batches": len(state.server_losses),
        "round_bytes_up": sum(this_round["up"].values()),
        "round_bytes_down": sum(this_round["down"].values()),
        "bytes_up": traffic.bytes_up,
        "bytes_down": traffic.bytes_down,
        "bytes_up_by_kind": this_round["up"],
        "bytes_down_by_kind": this_round["down"],
        "device_peak_rss_mb": {d: t.peak_rss_mb for d, t in state.telemetry.items()},
        "device_step_ms": {d: t.step_ms_median for d, t in state.telemetry.items()},
        "device_memory_mb": {d: m.profiles.get(d, {}).get("memory_mb")
                             for d in participants},  # measured by its dry run at join
        "clipped": state.clipped,
        "replay_ms": dict(state.replay_ms),  # --device-sync replay: server ms per device
        # --device-sync replay: whose log did not replay (asked for its weights), and whose
        # weights then arrived (bytes_up_by_kind's weights_fallback)
        "replay_mismatch": sorted({*state.replay_mismatch, *state.weights_fallback}),
        "weights_fallback": sorted(state.weights_fallback),
        "rejected": dict(m.rejected),
        "quarantined": dict(m.guard.quarantined),
        "device_errors": dict(m.device_errors),
        "round_seconds": seconds,
        **{k: round(max(v, 0.0), 4) for k, v in (times or {}).items()},
    }


def run_summary(opts: ServerOptions, run_id: str, manifest: Manifest, members: Members,
                records: list[dict[str, Any]], *, traffic: Traffic,
                peak_rss: dict[str, float], interrupted: bool,
                wall_seconds: float) -> dict[str, Any]:
    """summary.json: the run's options, outcome, traffic and what was refused."""
    o, m = opts, members
    accs = [r["test_accuracy"] for r in records]
    # a completed run's last round is evaluated on the full test set; an interrupted one
    # reports its last evaluation (test_examples says on how many)
    last_eval = next((r for r in reversed(records) if r["test_accuracy"] is not None), None)
    return {
        "run_id": run_id,
        "algorithm": o.train.algorithm,
        "model": o.model,
        "cut": manifest.cut,
        "dataset": o.dataset,
        "devices": sorted(m.ready) if m.ready else o.devices,
        "num_devices": o.devices,
        "rounds": o.rounds,
        "completed_rounds": len(records),
        "interrupted": interrupted,
        "deterministic": o.deterministic,
        "final_test_accuracy": last_eval["test_accuracy"] if last_eval else None,
        "final_test_examples": last_eval.get("test_examples") if last_eval else None,
        "test_accuracy_per_round": accs,
        "bytes_up": traffic.bytes_up,
        "bytes_down": traffic.bytes_down,
        "bytes_up_by_kind": dict(traffic.up),  # the run's; metrics.jsonl has each round's
        "bytes_down_by_kind": dict(traffic.down),
        "device_peak_rss_mb": peak_rss,
        "device_profiles": m.profiles,  # join profiles: board profile, measured memory
        "device_params": manifest.num_params,
        # --device-sync replay: updates whose log did not replay, and how many of those the
        # device's weights then replaced (the rest were dropped at the round's deadline)
        "replay_mismatch": sum(len(r.get("replay_mismatch", [])) for r in records),
        "weights_fallback": sum(len(r.get("weights_fallback", [])) for r in records),
        "rejected": dict(m.rejected),
        "rejected_by_device": m.guard.by_device,
        # device -> why, for the rest of the run; quarantine_dropped: messages dropped since
        "quarantined": dict(m.guard.quarantined),
        "quarantine_dropped": dict(m.guard.dropped),
        "device_errors": dict(m.device_errors),
        "config": {"train": o.train.to_json(), "server_optimizer": o.server_optimizer,
                   "server_lr": o.server_lr, "weighting": o.weighting, "seed": o.seed,
                   "per_round": o.per_round, "min_devices": o.min_devices,
                   "round_timeout": o.round_timeout, "aggregate": o.aggregate,
                   "trim": o.trim, "max_update_norm": o.max_update_norm,
                   "clip_update_norm": o.clip_update_norm,
                   "limits": o.limits.to_json(), "deterministic": o.deterministic,
                   "eval_every": o.eval_every, "eval_limit": o.eval_limit},
        "wall_seconds": wall_seconds,
    }


def round_line(rec: dict[str, Any], rounds: int) -> str:
    """A round's metrics record as the one line printed for it."""
    rss = [v for v in rec["device_peak_rss_mb"].values() if v is not None]
    steps = [v for v in rec["device_step_ms"].values() if v is not None]
    if rec["test_accuracy"] is None:
        test = "not evaluated (--eval-every)"
    else:
        n = rec.get("test_examples")
        test = f"test acc {rec['test_accuracy']:.4f}  test loss {rec['test_loss']:.4f}" + \
            (f" (n={n})" if n is not None else "")
    return (f"round {rec['round']:>3}/{rounds}  {test}  "
            f"devices {len(rec['updates'])}/{len(rec['participants'])}  "
            f"up {rec['bytes_up'] / 1e6:.2f} MB  down {rec['bytes_down'] / 1e6:.2f} MB  "
            f"device peak RSS {max(rss) if rss else float('nan'):.0f} MB  "
            f"step {statistics.median(steps) if steps else float('nan'):.2f} ms  "
            f"{rec['round_seconds']:.1f} s")
