"""Shared fixtures: real brokers on free loopback ports, and a Python with no torch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                         if os.path.exists("/usr/sbin/mosquitto") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed; .ci/run must apt-get install it")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    return path


class RestartableMosquitto:
    """A Mosquitto on a fixed port that can be killed and started again. With `persistence`
    its sessions and subscriptions survive a restart; without, only a client's resubscribe
    brings messages back. `log` keeps every line the broker logs (e.g. PINGREQs)."""

    def __init__(self, tmp: Path, *, persistence: bool = False, log: bool = False) -> None:
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        self.log = tmp / "mosquitto.log"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        lines += ([f"persistence true\npersistence_location {tmp}/\nautosave_interval 1"]
                  if persistence else ["persistence false"])
        lines += [f"log_dest file {self.log}\nlog_type all"] if log else []
        lines += ["user root"] if os.geteuid() == 0 else []
        self.conf.write_text("\n".join(lines) + "\n")
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.p: subprocess.Popen | None = None

    def start(self) -> None:
        self.p = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def kill(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[str]:
    """A real Mosquitto 2.x with stock limits on a free loopback port."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_port(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def embedded_broker() -> Iterator[str]:
    from server.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.url


@pytest.fixture
def no_torch_env(tmp_path: Path) -> dict[str, str]:
    """Environment in which `import torch` fails, as on a board with only the device install."""
    block = tmp_path / "no_torch"
    (block / "torch").mkdir(parents=True)
    (block / "torch" / "__init__.py").write_text(
        'raise ImportError("torch is not installed on this device (blocked by the test)")\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(ROOT)])}


def heron(*args: str) -> list[str]:
    return [sys.executable, "-m", "heron", *args]
