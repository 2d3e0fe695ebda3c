"""What the fleet bench measures from outside the processes it runs: CPU seconds and peak
RSS of each process (psutil, /proc VmHWM) and Mosquitto's $SYS message and byte counters."""

from __future__ import annotations

import os
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
        # the GIL contention that broke the threaded host: per sample, (time, 1-min load,
        # role -> [(threads, runnable threads) per process])
        self.threads: list[tuple[float, float, dict[str, list[tuple[int, int]]]]] = []
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
            counts = {role: [c for p in procs if (c := _thread_states(p.pid)) is not None]
                      for role, procs in self.procs.items()}
            self.threads.append((time.monotonic(), os.getloadavg()[0], counts))
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


def _thread_states(pid: int) -> tuple[int, int] | None:
    """(threads, threads in state R) of a process, from /proc/PID/task/*/stat."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    running = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the state follows the parenthesised name, which may itself hold spaces or ')'
        if stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"R":
            running += 1
    return len(tids), running


def thread_summary(samples: list[tuple[float, float, dict[str, list[tuple[int, int]]]]],
                   role: str, t0: float | None = None,
                   t1: float | None = None) -> dict[str, float | None]:
    """Over the samples in [t0, t1]: the peak 1-min load, the largest process's thread
    count, and runnable threads per process (peak and mean)."""
    inside = [s for s in samples
              if (t0 is None or s[0] >= t0) and (t1 is None or s[0] <= t1)]
    per_proc = [c for _, _, counts in inside for c in counts.get(role, [])]
    return {"load_1min_max": round(max(s[1] for s in inside), 2) if inside else None,
            "threads_max": max((c[0] for c in per_proc), default=None),
            "runnable_max": max((c[1] for c in per_proc), default=None),
            "runnable_mean": round(sum(c[1] for c in per_proc) / len(per_proc), 2)
            if per_proc else None}


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
