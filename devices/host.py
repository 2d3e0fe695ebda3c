"""Many devices in one process: `heron devices host`.

A process per device costs ~75 MB of interpreter, numpy and ONNX Runtime before any work
(150 device processes: about 11 GB), so a fleet of hundreds on one machine runs its devices
as threads of a few host processes instead. Each hosted device is the real `Device` loop with
its own MQTT client (own connection, client id, will and session), its own id and its own
shard; what the devices of one process share:

- the ONNX Runtime session of a bundle (`SharedModelDevice`): a session's `run` is
  thread-safe and `LocalModel` keeps no per-device state, so devices holding the same
  bundle (same train.onnx sha256) use the first one's session instead of one each;
- the process-wide ONNX Runtime thread pool (`runtime.use_process_pool`);
- the process's memory, which is why the join-time dry-run memory check is off here: it
  measures the process's peak RSS, i.e. the whole host, not one device (a board runs
  `heron device`, which checks). The telemetry's `peak_rss_mb` is then the host's too.

Two settings keep hundreds of devices in one process connected (the first fleet bench lost
74 of 300 devices to keepalive timeouts without them: 250 training threads starved paho's
network threads of the GIL, steps took 1.6 s instead of 8 ms and the broker cut the silent
clients off):

- one device of a host trains at a time (`TRAIN_SLOTS`): the process is GIL-bound with
  one ONNX Runtime thread, so more concurrent training only slows every step and the pings;
  a device's step times are measured inside its slot and stay a board's, its `round_s`
  includes the wait;
- a keepalive of `KEEPALIVE_S` instead of `heron device`'s 15 s, for the waits left.

And the devices' MQTT clients share one network thread (`MqttTransport(shared_loop=True)`,
a `selectors` loop over all their sockets) instead of paho's `loop_start` thread each: with
a thread per client, 1,000 devices in four hosts were 2,000 threads, up to 160 of a host
runnable at once, and devices dropped off on keepalive (BENCHMARKS.md, the fleet section).

A device costs its shard, its MQTT client (one socket, driven by the host's network
thread), its device-loop thread (blocked on its inbox while idle) and its bundle copy (the
received files; the session is shared).
"""

from __future__ import annotations

import logging
import resource
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.bundle import Bundle
from edge_runtime.device import (
    Device,
    DeviceExit,
    DeviceOptions,
    device_endpoint,
    message_limit,
)
from edge_runtime.protocol import RoundStart
from edge_runtime.runtime import LocalModel, RoundResult, TrainConfig
from edge_runtime.transport import Transport

log = logging.getLogger("heron.host")

TRAIN_SLOTS = 1  # devices of one host training at once (module doc)
KEEPALIVE_S = 60  # MQTT keepalive of a hosted device

FDS_PER_DEVICE = 4  # the MQTT socket, headroom for the shard and a bundle's files
FDS_BASE = 256  # the interpreter, ONNX Runtime, logs


class SharedModelDevice(Device):
    """A `Device` that shares its ONNX Runtime session with the other devices of its host
    holding the same bundle, and skips the per-process memory check (module doc)."""

    checks_memory = False
    # one worker thread per device would only add threads: a host's devices share its cores
    # and train TRAIN_SLOTS at a time, so they code their smashed data inside the step
    uplink_thread = False
    _models: dict[tuple[str, int | None], LocalModel] = {}
    _lock = threading.Lock()
    _slots = threading.BoundedSemaphore(TRAIN_SLOTS)

    def __init__(self, opts: DeviceOptions, transport: Transport | None = None) -> None:
        if transport is None:
            from edge_runtime.transport.mqtt import MqttTransport

            ep = device_endpoint(opts.device_id, opts.prefix)
            transport = MqttTransport(opts.broker, ep.client_id, ep.subscriptions, will=ep.will,
                                      credentials=opts.credentials, keepalive=KEEPALIVE_S,
                                      max_message_bytes=message_limit(opts.profile),
                                      shared_loop=True)
        super().__init__(opts, transport)

    def _train(self, msg: RoundStart, cfg: TrainConfig,
               send_smashed: Callable[[int, np.ndarray, np.ndarray], None]) -> RoundResult:
        with self._slots:
            return super()._train(msg, cfg, send_smashed)

    def _make_model(self, bundle: Bundle) -> tuple[object, int | None]:
        key = (bundle.manifest.files.get("train.onnx", ""), self.opts.threads)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = LocalModel(bundle, self.opts.threads)
        model.check_data(self.x, self.y)
        return model, model.threads


def raise_open_files(needed: int) -> int:
    """Raise this process's soft open-file limit towards `needed` (never past the hard
    limit); returns the soft limit now. Children inherit it (the bench's Mosquitto too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        log.info("open-file limit raised from %d to %d (hard limit %s)", soft, want, hard)
        return want
    return soft


@dataclass
class HostResult:
    codes: dict[str, int]  # device id -> exit code (1: the loop raised)
    errors: dict[str, str]  # device id -> what ended it, when not a clean stop


def host_devices(opts: Sequence[DeviceOptions],
                 device_cls: type[Device] = SharedModelDevice) -> HostResult:
    """Run one `Device` per options in threads of this process until each ends (the
    server's stop, or its own error); the open-file limit is raised first so hundreds of
    MQTT connections fit."""
    if not opts:
        raise ValueError("no devices to host")
    limit = raise_open_files(FDS_BASE + FDS_PER_DEVICE * len(opts))
    if limit < FDS_BASE + 3 * len(opts):
        raise ValueError(f"{len(opts)} devices need about {3 * len(opts)} open files but the "
                         f"hard limit is {limit}; help: host fewer devices per process or "
                         "raise the hard limit (ulimit -Hn, limits.conf)")
    device_cls.prepare_process(opts[0])
    devices = [device_cls(o) for o in opts]
    result = HostResult({}, {})

    def run_one(device: Device) -> None:
        dev = device.opts.device_id
        try:
            result.codes[dev] = device.run()
        except DeviceExit as exc:
            result.codes[dev], result.errors[dev] = exc.code, str(exc)
        except Exception as exc:  # noqa: BLE001 - one device's failure must not end the host
            log.exception("%s: stopped by an error", dev)
            result.codes[dev], result.errors[dev] = 1, f"{type(exc).__name__}: {exc}"
        if result.codes[dev] not in (0, None) and dev not in result.errors:
            result.errors[dev] = f"exit code {result.codes[dev]}"

    threads = [threading.Thread(target=run_one, args=(d,), name=d.opts.device_id, daemon=True)
               for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def shard_options(shards: Path, ids: Sequence[str], base: DeviceOptions) -> list[DeviceOptions]:
    """One `DeviceOptions` per id, each with its shard `shards/ID.npz` (from `heron devices
    partition`); the rest as in `base`."""
    from dataclasses import replace

    missing = [i for i in ids if not (shards / f"{i}.npz").is_file()]
    if missing:
        raise ValueError(f"no shard for {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                         + f" in {shards}; help: `heron devices partition --devices N --out "
                         f"{shards}` writes dev-0.npz ... dev-(N-1).npz")
    return [replace(base, device_id=i, data=shards / f"{i}.npz") for i in ids]
