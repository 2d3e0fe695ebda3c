"""`--tensorboard DIR`: each round's metrics record as TensorBoard scalars (step = round), the
view ML users already read. The writer comes from torch and needs the `tensorboard` package,
imported only when the flag is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TAGS = {  # metrics.jsonl key -> scalar tag; a None value (no evaluation that round) is skipped
    "test_accuracy": "test/accuracy",
    "test_loss": "test/loss",
    "server_train_loss": "train/server_loss",
    "device_local_loss": "train/device_local_loss",
    "round_bytes_up": "bytes/up",
    "round_bytes_down": "bytes/down",
    "round_seconds": "time/round_seconds",
    "seconds_waiting": "time/waiting",
    "seconds_training": "time/training",
    "seconds_evaluating": "time/evaluating",
    "seconds_aggregating": "time/aggregating",
}
PER_DEVICE = {"device_peak_rss_mb": "peak_rss_mb", "device_step_ms": "step_ms_median"}


class TensorBoardMissing(RuntimeError):
    pass


def open_writer(logdir: Path) -> Any:
    """A `SummaryWriter` on `logdir`; `TensorBoardMissing` says how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError naming tensorboard when it is absent
        raise TensorBoardMissing(
            f"--tensorboard needs the tensorboard package ({exc}); help: pip install "
            "tensorboard (it is in heron's server extra: pip install 'heron[server]')") from exc
    return SummaryWriter(log_dir=str(logdir))


def round_scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics record, by tag (devices under device/ID/...)."""
    out: dict[str, float] = {}
    for key, tag in TAGS.items():
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    for key, name in PER_DEVICE.items():
        for dev, value in (rec.get(key) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"device/{dev}/{name}"] = float(value)
    return out


class RoundLog:
    """Writes each round's scalars and flushes, so a TensorBoard open on DIR sees them as the
    run goes."""

    def __init__(self, logdir: Path) -> None:
        self.writer = open_writer(logdir)

    def add(self, rec: dict[str, Any]) -> None:
        step = int(rec["round"])
        for tag, value in round_scalars(rec).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
