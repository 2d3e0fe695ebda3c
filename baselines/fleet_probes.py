"""What the fleet bench measures from outside the processes it runs: CPU seconds and peak
RSS of each process (psutil, /proc VmHWM) and Mosquitto's $SYS message and byte counters."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil

SYS_TOPICS = {  # Mosquitto's $SYS counters -> our names
    "$SYS/broker/messages/received": "msgs_in",
    "$SYS/broker/messages/sent": "msgs_out",
    "$SYS/broker/bytes/received": "bytes_in",
    "$SYS/broker/bytes/sent": "bytes_out",
    "$SYS/broker/publish/messages/dropped": "dropped",
    "$SYS/broker/clients/connected": "clients",
}

class Sampler:
    """CPU seconds and peak RSS of named processes, every `every` seconds in a thread; a
    snapshot of the counters can be taken at any moment (`snapshot`)."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.procs: dict[str, list[psutil.Process]] = {}
        self.cpu: dict[str, dict[int, float]] = {}  # role -> pid -> last CPU seconds
        self.main_cpu: dict[str, dict[int, float]] = {}  # role -> pid -> main thread's
        self.hwm: dict[str, dict[int, float]] = {}  # role -> pid -> peak RSS MB
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fleet-sampler", daemon=True)

    def add(self, role: str, pid: int) -> None:
        with self._lock:
            self.procs.setdefault(role, []).append(psutil.Process(pid))

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            for role, procs in self.procs.items():
                for p in procs:
                    try:
                        with p.oneshot():
                            t = p.cpu_times()
                            cpu = t.user + t.system
                            main = next((th.user_time + th.system_time for th in p.threads()
                                         if th.id == p.pid), None)
                        hwm = _vm_hwm_mb(p.pid)
                    except (psutil.Error, OSError):
                        continue  # exited: its last sample stands
                    self.cpu.setdefault(role, {})[p.pid] = cpu
                    if main is not None:
                        self.main_cpu.setdefault(role, {})[p.pid] = main
                    if hwm is not None:
                        self.hwm.setdefault(role, {})[p.pid] = hwm

    def snapshot(self) -> dict[str, dict[str, float]]:
        self.sample()
        with self._lock:
            return {"cpu": {r: sum(v.values()) for r, v in self.cpu.items()},
                    "main_cpu": {r: sum(v.values()) for r, v in self.main_cpu.items()}}


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class SysCounters:
    """Mosquitto's $SYS counters as they arrive: name -> [(monotonic time, value)]."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.series: dict[str, list[tuple[float, float]]] = {}
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id=f"heron-fleet-bench-{port}")
        self._client.on_connect = lambda c, *a: [c.subscribe(t) for t in SYS_TOPICS]
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            value = float(msg.payload.decode())
        except ValueError:
            return
        self.series.setdefault(SYS_TOPICS[msg.topic], []).append((time.monotonic(), value))

    def rate(self, name: str, t0: float, t1: float) -> float | None:
        """Per second between the last sample at or before t0 and the first at or after t1."""
        s = self.series.get(name, [])
        before = [p for p in s if p[0] <= t0]
        after = [p for p in s if p[0] >= t1]
        if not before or not after or after[0][0] <= before[-1][0]:
            return None
        (ta, va), (tb, vb) = before[-1], after[0]
        return (vb - va) / (tb - ta)

    def last(self, name: str) -> float | None:
        s = self.series.get(name)
        return s[-1][1] if s else None

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
