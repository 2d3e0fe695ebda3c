"""Launch a whole federation on this machine: broker, server process, device processes.

This is what `heron run` does. Each part is a real OS process talking over a real broker,
exactly as when the parts are started by hand on different machines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heron.lifecycle import child_env
from heron_data.datasets import load_dataset
from heron_data.partition import partition, write_shards


@dataclass(frozen=True)
class FleetOptions:
    out: Path
    devices: int = 3
    dataset: str = "digits"
    data_dir: str | None = None
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    device_threads: int = 1
    broker: str | None = None  # None: start the embedded broker
    prefix: str = "heron"
    device_env: dict[str, str] | None = None  # extra environment for device processes
    credentials_dir: Path | None = None  # from `heron devices provision`: dev-N.json each
    torch_devices: bool = False  # first-order baselines: `heron device --torch`
    dataset_options: dict[str, Any] = field(default_factory=dict)  # load_dataset keywords


def make_shards(opts: FleetOptions, shard_dir: Path,
                progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """One dev-N.npz per device from the dataset's training split, in `shard_dir`;
    `progress(done, total)` after each shard."""
    ds = load_dataset(opts.dataset, opts.data_dir, seed=opts.seed, **opts.dataset_options)
    parts = partition(ds.y_train, opts.devices, opts.partition, opts.alpha, opts.seed)
    return write_shards(ds.x_train, ds.y_train, parts, shard_dir, progress=progress)


def _heron(*args: str) -> list[str]:
    return [sys.executable, "-m", "heron", *args]


def start_devices(opts: FleetOptions, broker: str, shards: list[Path]) -> list[subprocess.Popen]:
    logs = opts.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # each device stops by itself if this process dies without warning (die_with_parent)
    env = child_env({**os.environ, **(opts.device_env or {})})
    procs = []
    for i, shard in enumerate(shards):
        dev = f"dev-{i}"
        log = (logs / f"{dev}.log").open("w")
        procs.append(subprocess.Popen(
            _heron("device", "--broker", broker, "--id", dev, "--data", str(shard),
                   "--threads", str(opts.device_threads), "--prefix", opts.prefix,
                   # one store for the fleet: devices on this machine share the mapped pages
                   "--bundle-cache", str(opts.out / "device-bundles"),
                   *(["--torch"] if opts.torch_devices else []),
                   *(["--credentials", str(opts.credentials_dir / f"{dev}.json")]
                     if opts.credentials_dir else [])),
            stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL))
    return procs


def stop_all(procs: list[subprocess.Popen], grace: float = 15.0) -> list[int | None]:
    """Wait for a clean exit, then SIGTERM, then SIGKILL: never leave orphans behind."""
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


def terminate(procs: list[subprocess.Popen], grace: float = 30.0) -> list[int | None]:
    """Stop now: SIGTERM to all at once (each stops cleanly: the server keeps its last
    checkpoint, a device says it is offline), SIGKILL whatever still runs after `grace`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]
