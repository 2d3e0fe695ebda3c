"""How heron processes stop: on a signal, and when the `heron run` that started them dies.

Standard library only: `heron device` imports this on boards that have no torch.

- `StopSignals` turns SIGTERM, SIGINT and SIGHUP into one graceful stop per process: either
  a callback (the server sets a flag it checks between messages) or a `Stopped` exception in
  the main thread. Later signals are ignored: a `timeout` or a service manager may deliver the
  same stop twice (to the process and to its group), and the graceful path is bounded; the
  way to force is SIGKILL, which `heron run` sends itself after a grace period.
- `die_with_parent` makes a child of `heron run` get SIGTERM when that parent dies without
  warning (SIGKILL, OOM): `prctl(PR_SET_PDEATHSIG)` on Linux, a thread watching
  `os.getppid()` elsewhere. The parent names itself in `PARENT_ENV`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

log = logging.getLogger("heron.lifecycle")

PARENT_ENV = "HERON_PARENT_PID"  # set by `heron run` in its children's environment
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None))
                     if s is not None)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_code(signum: int) -> int:
    """The shell's convention for 'stopped by signal N': 128 + N (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(BaseException):
    """A stop signal arrived. A BaseException like KeyboardInterrupt, so the `except
    Exception` that keeps a loop alive on bad input does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum


class StopSignals:
    """Install the stop handlers for a `with` block; restore the previous ones after it.

    The first signal calls `on_stop(signum)` if given, else raises `Stopped` in the main
    thread, except inside `deferred()` blocks (starting a child, so none is left untracked),
    where it is raised when the block ends. Only the first signal counts.
    """

    def __init__(self, on_stop: Callable[[int], None] | None = None) -> None:
        self.on_stop = on_stop
        self.signum: int | None = None  # the first stop signal, once one arrived
        self._depth = 0
        self._raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        _quiet_stdout_if_orphaned()
        if self.signum is not None:
            return  # the stop already under way is bounded; SIGKILL forces
        self.signum = signum
        if self.on_stop is not None:
            self.on_stop(signum)
        elif self._depth == 0:
            self._raise()

    def _raise(self) -> None:
        assert self.signum is not None
        if not self._raised:
            self._raised = True
            raise Stopped(self.signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block a stop must not cut in half; a stop that arrived in it is raised after."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self.signum is not None and self.on_stop is None:
            self._raise()


# -- parent death ---------------------------------------------------------------------------
_parent_pid: int | None = None


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that must not outlive this process."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def die_with_parent(poll_s: float = 1.0) -> bool:
    """If `heron run` started this process (PARENT_ENV), get SIGTERM when it dies.

    Returns whether a parent is watched. The variable is removed so that processes this one
    starts do not inherit it. A parent already gone (it died before we got here) is handled
    like one that dies later.
    """
    global _parent_pid
    value = os.environ.pop(PARENT_ENV, None)
    if not value:
        return False
    try:
        parent = int(value)
    except ValueError:
        log.warning("ignoring %s=%r: not a process id", PARENT_ENV, value)
        return False
    _parent_pid = parent
    if not _set_pdeathsig(signal.SIGTERM):
        threading.Thread(target=_watch_parent, args=(parent, poll_s), name="heron-parent-watch",
                         daemon=True).start()
    if os.getppid() != parent:  # it died before the kernel knew to tell us
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _set_pdeathsig(signum: int) -> bool:
    """Linux: the kernel sends `signum` to this process when its parent thread exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, poll_s: float) -> None:
    """The portable fallback: once re-parented, send ourselves the same SIGTERM."""
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _quiet_stdout_if_orphaned() -> None:
    """A child whose parent is gone writes its last lines to a pipe nobody reads; point
    stdout at /dev/null so they cannot fail (BrokenPipeError) and cut its cleanup short."""
    if _parent_pid is None or os.getppid() == _parent_pid:
        return
    try:
        if stat.S_ISFIFO(os.fstat(1).st_mode):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
    except OSError:
        pass
