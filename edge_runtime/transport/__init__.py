"""The transport seam: what the device and server loops need from a message bus.

`Transport` is the protocol both loops are written against; `MqttTransport` (`mqtt.py`,
the one module that imports paho's client) is what the CLI builds, and `LoopbackTransport`
(`loopback.py`) connects loops inside one process through a `LoopbackBroker`, for tests.
Both chunk on the way out and reassemble and decode on the way in through the same
`Receiver`, so the codec's limits and the duplicate accounting are the same on either.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

from edge_runtime.protocol import (
    MAX_MESSAGE_BYTES,
    CodecError,
    Message,
    Reassembler,
    chunk,
    decode,
    encode,
    wire_bytes,
)
from edge_runtime.protocol.topics import payload_kind

QOS = 1
RECONNECTED = "$heron/reconnected"


class BrokerError(ConnectionError):
    """The broker cannot be reached or refused us."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @staticmethod
    def parse(url: str) -> BrokerAddress:
        """mqtt://HOST[:PORT] (default 1883) or mqtts://HOST[:PORT] (TLS, default 8883)."""
        if "://" not in url:
            url = "mqtt://" + url
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parsed.hostname:
            raise ValueError(f"broker URL {url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
        tls = parsed.scheme in ("mqtts", "ssl")
        try:
            port = parsed.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ValueError(f"broker URL {url!r} has a bad port") from exc
        return BrokerAddress(parsed.hostname, port, tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Incoming:
    """A decoded message, or the reason a payload on `topic` was rejected.

    `topic` is RECONNECTED (and `message` None) when the link to the broker came back after
    a drop: the loop then re-announces itself, since the broker may have lost its state.
    """

    topic: str
    message: Message | None
    nbytes: int  # as received: the MQTT payloads, chunk headers included
    error: str | None = None
    duplicate: bool = False  # a redelivered chunk or message id: already applied, dropped


@dataclass(frozen=True)
class Endpoint:
    """Who a loop is on the bus: its client id, what it listens to, and the retained
    message the broker publishes for it if it vanishes."""

    client_id: str
    subscriptions: list[str]
    will: tuple[str, Message] | None = None


class Transport(Protocol):
    """What the loops use. `publish` returns the payload bytes sent (chunk headers
    included); `get` returns None when nothing arrived within `timeout`."""

    address: object  # printed in the loops' messages (where devices should connect)
    bytes_in: int
    bytes_out: int

    def start(self, timeout: float = 15.0) -> None: ...

    def publish(self, topic: str, msg: Message, *, retain: bool = False,
                wait: float | None = None) -> int: ...

    def get(self, timeout: float | None = None) -> Incoming | None: ...

    def stop(self) -> None: ...

    def take_dropped_by_topic(self) -> dict[str, int]: ...

    def pending_by_topic(self) -> dict[str, int]: ...

    @property
    def incomplete_dropped(self) -> int: ...


def payloads(msg: Message) -> list[bytes]:
    """The chunks one message travels as."""
    return chunk(encode(msg), msg.msg_id)


class Receiver:
    """The inbound half every transport shares: reassemble chunks, decode, enqueue an
    `Incoming` (or the reason a payload was refused), and keep the per-topic accounting.
    `_receive` may run on another thread than `get` (paho's network thread)."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.bytes_in = 0
        self.bytes_out = 0
        # the same bytes by the kind of message their topic carries ("other": none of ours)
        self.bytes_in_by_kind: dict[str, int] = {}
        self.bytes_out_by_kind: dict[str, int] = {}
        self._reassembler = Reassembler(max_message_bytes=max_message_bytes)
        self._lock = threading.Lock()

    def _receive(self, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared retained message
            return
        with self._lock:
            self.bytes_in += len(payload)
            kind = payload_kind(topic) or "other"
            self.bytes_in_by_kind[kind] = self.bytes_in_by_kind.get(kind, 0) + len(payload)
        try:
            with self._lock:  # the loop takes the per-topic drop counts from another thread
                seen = self._reassembler.duplicates
                data = self._reassembler.add(topic, payload, kind=payload_kind(topic))
            if data is None:
                if self._reassembler.duplicates > seen:  # the receiver counts it, per topic
                    self.inbox.put(Incoming(topic, None, len(payload),
                                            error="a chunk or message id already received",
                                            duplicate=True))
                return
            self.inbox.put(Incoming(topic, decode(data), wire_bytes(payload, len(data))))
        except CodecError as exc:
            self.inbox.put(Incoming(topic, None, len(payload), error=str(exc)))
        except Exception as exc:  # noqa: BLE001 - never let a payload kill the caller's thread
            self.inbox.put(Incoming(topic, None, len(payload),
                                    error=f"undecodable payload ({type(exc).__name__}: {exc})"))

    def _sent(self, n: int, kind: str) -> None:
        with self._lock:
            self.bytes_out += n
            self.bytes_out_by_kind[kind] = self.bytes_out_by_kind.get(kind, 0) + n

    def get(self, timeout: float | None = None) -> Incoming | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def take_dropped_by_topic(self) -> dict[str, int]:
        """Chunked messages dropped incomplete per topic since the last call."""
        with self._lock:
            return self._reassembler.take_dropped()

    def pending_by_topic(self) -> dict[str, int]:
        """Chunked messages still incomplete, per topic (at the end of a run: never finished)."""
        with self._lock:
            return self._reassembler.pending_by_topic()

    @property
    def incomplete_dropped(self) -> int:
        """Chunked messages dropped incomplete: their missing chunks never arrived (expired),
        or their sender went over its reassembly budget (evicted)."""
        return self._reassembler.expired + self._reassembler.evicted


def __getattr__(name: str) -> object:
    # MqttTransport is imported on first use, so the loopback path needs no paho client
    if name == "MqttTransport":
        from edge_runtime.transport.mqtt import MqttTransport

        return MqttTransport
    if name in ("LoopbackBroker", "LoopbackTransport"):
        from edge_runtime.transport import loopback

        return getattr(loopback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["QOS", "RECONNECTED", "BrokerAddress", "BrokerError", "Credentials", "Endpoint",
           "Incoming", "LoopbackBroker", "LoopbackTransport", "MqttTransport", "Receiver",
           "Transport", "payloads"]
