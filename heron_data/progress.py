"""A throttled progress line for long work (evaluation, partition, pack): at most one line
per interval, so a long command shows it is alive without flooding a log. Here, beside the
shard writer, because the server, the fleet and the CLI may all import the data package."""

from __future__ import annotations

import time
from collections.abc import Callable

EVERY_S = 5.0

Progress = Callable[[int, int], None]  # (done, total)


def throttled(label: str, unit: str = "", every_s: float = EVERY_S,
              clock: Callable[[], float] = time.monotonic,
              out: Callable[[str], None] = lambda s: print(s, flush=True)) -> Progress:
    """A (done, total) callback printing `label: done/total unit (N s)` at most once per
    `every_s` and never for the end (the command's own result line says that)."""
    t0 = clock()
    last = [t0]
    unit = f" {unit}" if unit else ""

    def report(done: int, total: int) -> None:
        now = clock()
        if done < total and now - last[0] >= every_s:
            last[0] = now
            out(f"{label}: {done}/{total}{unit} ({now - t0:.0f} s)")
    return report
