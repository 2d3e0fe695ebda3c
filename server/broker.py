"""The zero-setup MQTT broker: amqtt (pure Python) on a loopback port, in a thread.

Production and CI use Mosquitto; this one exists so `heron run` needs nothing installed
beyond pip. It runs its own asyncio loop in a daemon thread and stops cleanly.

Its limit: one Python thread relays every message, so a large fleet's broadcasts outrun it
and amqtt gives up on acknowledgements (`Timeout waiting for PUBACK`, logged by amqtt with
a traceback per message). `EMBEDDED_BROKER_DEVICES` is the largest fleet it served cleanly
in the fleet bench (BENCHMARKS.md); past it `heron run` warns up front, and `QuietBrokerLog`
turns amqtt's tracebacks into one line that points to Mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
from typing import Any, TextIO

# the largest fleet the embedded broker served cleanly (`heron bench --workload fleet
# --broker embedded`, BENCHMARKS.md "The embedded broker's limit")
EMBEDDED_BROKER_DEVICES = 60

MOSQUITTO_HELP = ("help: use Mosquitto for larger fleets: `heron devices provision --out "
                  "broker/ server dev-0 dev-1 ...` writes its config and logins, then "
                  "`mosquitto -c broker/mosquitto.conf` and `heron run --broker "
                  "mqtt://127.0.0.1:1883 --credentials-dir broker/credentials`")


def too_many_devices(devices: int) -> str | None:
    """The warning for a fleet larger than the embedded broker serves cleanly, else None."""
    if devices <= EMBEDDED_BROKER_DEVICES:
        return None
    return (f"{devices} devices is more than the embedded broker serves cleanly (about "
            f"{EMBEDDED_BROKER_DEVICES}); expect slow rounds and lost acknowledgements; "
            + MOSQUITTO_HELP)


class QuietBrokerLog(logging.Handler):
    """amqtt's errors as one line each instead of tracebacks; acknowledgement timeouts
    (the broker falling behind) as one line the first time, pointing to Mosquitto, and
    counted after that."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(logging.ERROR)
        self.stream = stream
        self.timeouts = 0
        self.errors = 0

    @staticmethod
    def _is_timeout(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return "PUBACK" in record.getMessage() or (
            isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and "PUBACK" in str(exc))

    def emit(self, record: logging.LogRecord) -> None:
        stream = self.stream or sys.stderr
        try:
            if self._is_timeout(record):
                self.timeouts += 1
                if self.timeouts == 1:
                    print("heron: the embedded MQTT broker is falling behind (Timeout waiting "
                          "for PUBACK: a client did not acknowledge in time; the message is "
                          f"sent again); {MOSQUITTO_HELP}", file=stream, flush=True)
                return
            self.errors += 1
            exc = record.exc_info[1] if record.exc_info else None
            print(f"heron: embedded MQTT broker: {record.getMessage()}"
                  + (f": {type(exc).__name__}: {exc}" if exc is not None else ""),
                  file=stream, flush=True)
        except (OSError, ValueError):  # the console is gone
            pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }

    def _main(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            self._broker = Broker(self._config())
            await self._broker.start()

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # surfaced to the caller of start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        loop.run_forever()
        loop.close()

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        amqtt_log = logging.getLogger("amqtt")
        if not any(isinstance(h, QuietBrokerLog) for h in amqtt_log.handlers):
            amqtt_log.addHandler(QuietBrokerLog())
        amqtt_log.propagate = False  # no tracebacks through the root logger
        self._thread = threading.Thread(target=self._main, name="heron-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"embedded MQTT broker failed to start on {self.url}: "
                               f"{self._error!r}; help: pick another --broker-port or use "
                               "--broker mqtt://HOST:PORT")
        return self

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            fut.result(timeout=10)
        except Exception:  # noqa: BLE001 - a broker that fails to shut down is still stopped
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        quiet = [h for h in logging.getLogger("amqtt").handlers if isinstance(h, QuietBrokerLog)]
        if quiet and quiet[0].timeouts:
            print(f"heron: the embedded MQTT broker timed out on {quiet[0].timeouts} "
                  "acknowledgements in all", file=sys.stderr, flush=True)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
