"""The device's smashed-data uplink: coding and publishing off the training step.

A step hands its smashed batch to `Uplink.send` and goes on with its next forward passes
while a worker thread codes the batch (`smashed_codec`), encodes and chunks the message and
gives it to the transport. numpy's ufuncs and reductions and ONNX Runtime's `run` release
the GIL, so on a board with a core to spare (every supported board has four) the codec's
time comes off the step's. The CPU time is not saved, and on steps of a millisecond it grows
(the hand-over costs): BENCHMARKS.md, "Off the step". Devices hosted many to a process use
`InlineUplink`, the same interface with no thread.

Order and failures are the step's own: batches go out in the order they were sent; a batch
the worker cannot publish (activations the codec refuses, say) is raised again in the
sending thread at its next `send` or at `flush`, and later batches of the round are dropped.
At most `depth` batches wait, so the smashed data held in memory stay bounded; a step that
finds the queue full waits for the worker. The arrays handed over must not be written
afterwards (ONNX Runtime returns fresh outputs each run; the labels are a fresh gather).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

import numpy as np

Publish = Callable[[int, np.ndarray, np.ndarray], None]
DEPTH = 2  # the batch being coded and one more: enough to cover a step, bounded memory


class Uplink:
    """Runs `publish(step, activations, labels)` on one worker thread, in order."""

    def __init__(self, publish: Publish, *, depth: int = DEPTH,
                 name: str = "heron-uplink") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._publish = publish
        self._queue: queue.Queue[tuple[int, np.ndarray, np.ndarray] | None] = \
            queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure the round's other batches drop
                    self._publish(*item)
            except BaseException as exc:  # noqa: BLE001  (re-raised in the sender)
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def send(self, step: int, activations: np.ndarray, labels: np.ndarray) -> None:
        """Queue one batch (waits while `depth` batches wait); raises an earlier batch's
        failure instead."""
        if self._closed:
            raise RuntimeError("the uplink is closed")
        self._raise()
        self._queue.put((step, activations, labels))

    def flush(self) -> None:
        """Wait until every queued batch is published; raises the first failure."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Publish what is queued, then stop the worker (failures are not raised here)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> Uplink:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class InlineUplink:
    """`Uplink`'s interface with no thread: `send` codes and publishes in the caller. For
    many devices hosted in one process (`devices.host`), whose cores are already shared and
    where a thread per device would only add threads."""

    def __init__(self, publish: Publish) -> None:
        self.send = publish

    def flush(self) -> None:
        """Nothing waits: every `send` has published already."""

    def close(self) -> None:
        """Nothing to stop."""

    def __enter__(self) -> InlineUplink:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def make_uplink(publish: Publish, threaded: bool) -> Uplink | InlineUplink:
    """The uplink a device codes its smashed data through: on a worker thread, or inline."""
    return Uplink(publish) if threaded else InlineUplink(publish)
