"""What the live fleet page shows, kept by the server loop as it runs.

The loop calls a `FleetObserver` at a few points (a message handled, a round started, a round
recorded); without `--http` that is the no-op base class, so a run without the page does no
extra work. `FleetView` keeps a copy of what the page needs under a lock: the loop thread
writes it, the page's thread (`server.fleet_page`) reads `snapshot()`; neither reaches into
the other's objects.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from edge_runtime.protocol import topics
from edge_runtime.transport import Incoming

if TYPE_CHECKING:
    from server.members import Members
    from server.options import ServerOptions
    from server.round_state import RoundState

MAX_DEVICES = 10_000  # devices the page tracks; a flood of invented ids is not kept
# the per-round metrics the page charts (the whole record holds per-device dicts that grow
# with the fleet; metrics.jsonl has them)
HISTORY_KEYS = ("round", "test_accuracy", "test_loss", "server_train_loss", "device_local_loss",
                "round_bytes_up", "round_bytes_down", "round_seconds", "elapsed_seconds")
PROFILE_KEYS = ("profile", "machine", "samples", "threads", "rss_mb", "memory_mb", "budget_mb")


def split_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `PORT` (host 127.0.0.1) -> (host, port); ValueError naming
    the form otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {text!r}: expected HOST:PORT or PORT with a port in "
                         "0..65535 (0: any free port), e.g. 127.0.0.1:8080")
    return host, int(port)


class FleetObserver:
    """The loop's hooks; this base does nothing (no `--http`)."""

    def started(self, run_id: str, opts: ServerOptions, records: list[dict[str, Any]]) -> None:
        """The run begins (a resumed run with its earlier rounds)."""

    def message(self, inc: Incoming, members: Members, state: RoundState | None) -> None:
        """One incoming message was handled."""

    def round_started(self, r: int, participants: tuple[str, ...], timeout_s: float) -> None:
        """Round `r` was broadcast to `participants`; it closes within `timeout_s`."""

    def round_done(self, rec: dict[str, Any], members: Members) -> None:
        """Round `rec["round"]` was recorded."""

    def finished(self) -> None:
        """The loop ended (finished, interrupted or failed)."""


def fleet_observer(opts: ServerOptions) -> FleetObserver:
    """A `FleetView` when the page is on, else the no-op observer."""
    return FleetView(opts.prefix) if opts.http else FleetObserver()


class FleetView(FleetObserver):
    """The fleet as the page shows it; `version` grows with every change."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self.version = 0
        self._run: dict[str, Any] = {}
        self._devices: dict[str, dict[str, Any]] = {}
        self._round: dict[str, Any] | None = None
        self._history: list[dict[str, Any]] = []

    # -- written by the loop thread ----------------------------------------------------------
    def started(self, run_id: str, opts: ServerOptions, records: list[dict[str, Any]]) -> None:
        with self._lock:
            self._run = {"run_id": run_id, "model": opts.model, "dataset": opts.dataset,
                         "algorithm": opts.train.algorithm, "rounds": opts.rounds,
                         "devices": opts.devices, "state": "running"}
            self._history = [_history_row(r) for r in records]
            self.version += 1

    def message(self, inc: Incoming, members: Members, state: RoundState | None) -> None:
        route = topics.parse_up(inc.topic, self.prefix)
        sender = route[0] if route else topics.parse_status(inc.topic, self.prefix)
        with self._lock:
            if sender is not None and topics.is_id(sender):
                dev = self._device(sender)
                if dev is not None:
                    dev["bytes_up"] += inc.nbytes
                    dev["last_seen"] = time.time()
                    self._member(sender, dev, members)
            rnd = self._round
            if state is not None and rnd is not None and rnd["round"] == state.start.round and \
                    (len(state.updates) != len(rnd["reported"]) or
                     len(state.gone) != len(rnd["gone"])):
                rnd["reported"] = list(state.updates)
                rnd["gone"] = sorted(state.gone - set(state.updates))
            self.version += 1

    def round_started(self, r: int, participants: tuple[str, ...], timeout_s: float) -> None:
        now = time.time()
        with self._lock:
            self._round = {"round": r, "participants": list(participants), "reported": [],
                           "gone": [], "started": now, "deadline": now + timeout_s}
            self.version += 1

    def round_done(self, rec: dict[str, Any], members: Members) -> None:
        with self._lock:
            self._history.append(_history_row(rec))
            for key, field in (("device_peak_rss_mb", "peak_rss_mb"),
                               ("device_step_ms", "step_ms_median")):
                for dev_id, value in rec.get(key, {}).items():
                    dev = self._device(dev_id)
                    if dev is not None and value is not None:
                        dev[field] = max(dev[field] or 0.0, value) \
                            if field == "peak_rss_mb" else value
            for dev_id, dev in self._devices.items():  # rejections counted outside messages
                self._member(dev_id, dev, members)
            self._round = None
            self.version += 1

    def finished(self) -> None:
        with self._lock:
            self._run["state"] = "finished"
            self._round = None
            self.version += 1

    def _device(self, dev_id: str) -> dict[str, Any] | None:
        dev = self._devices.get(dev_id)
        if dev is None and len(self._devices) < MAX_DEVICES:
            dev = self._devices[dev_id] = {
                "id": dev_id, "online": False, "ready": False, "quarantined": False,
                "profile": {}, "last_seen": None, "peak_rss_mb": None, "step_ms_median": None,
                "bytes_up": 0, "rejected": 0}
        return dev

    @staticmethod
    def _member(dev_id: str, dev: dict[str, Any], members: Members) -> None:
        """Copy what `members` decided about one device (the loop thread owns `members`)."""
        dev["online"] = dev_id in members.online
        dev["ready"] = dev_id in members.ready
        dev["quarantined"] = dev_id in members.guard.quarantined
        dev["rejected"] = sum(members.guard.by_device.get(dev_id, {}).values())
        if not dev["profile"] and dev_id in members.profiles:
            prof = members.profiles[dev_id]
            dev["profile"] = {k: prof[k] for k in PROFILE_KEYS if prof.get(k) is not None}

    # -- read by the page's thread ---------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: `devices` (sorted by id), `round` (None between rounds),
        `history` (one row per recorded round), `run`, `version`, `now` (server clock)."""
        with self._lock:
            return {
                "run": dict(self._run),
                "devices": [dict(d, profile=dict(d["profile"]))
                            for _, d in sorted(self._devices.items())],
                "round": None if self._round is None else
                {k: list(v) if isinstance(v, list) else v for k, v in self._round.items()},
                "history": [dict(h) for h in self._history],
                "version": self.version,
                "now": time.time(),
            }


def _history_row(rec: dict[str, Any]) -> dict[str, Any]:
    row = {k: rec.get(k) for k in HISTORY_KEYS}
    row["updates"] = len(rec.get("updates", []))
    row["participants"] = len(rec.get("participants", []))
    return row
