"""The one adapter between heron and paho-mqtt: paho types never leave this module.

Callbacks only reassemble, decode and enqueue; the caller's loop pulls `Incoming` items
from a queue. Subscriptions are (re)made in on_connect so a reconnect resubscribes.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_runtime.protocol import (
    MAX_MESSAGE_BYTES,
    CodecError,
    Message,
    Reassembler,
    chunk,
    decode,
    encode,
)
from edge_runtime.protocol.topics import payload_kind

QOS = 1


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
    nbytes: int
    error: str | None = None
    duplicate: bool = False  # a redelivered chunk or message id: already applied, dropped


RECONNECTED = "$heron/reconnected"


class MqttTransport:
    def __init__(
        self,
        url: str,
        client_id: str,
        subscriptions: list[str],
        *,
        will: tuple[str, Message] | None = None,
        credentials: Credentials | None = None,
        keepalive: int = 15,
        persistent: bool = True,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        """`max_message_bytes`: larger incoming messages are refused at their first chunk
        (a device passes what its memory budget can hold)."""
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.bytes_in = 0
        self.bytes_out = 0
        self.connected = threading.Event()
        self._refused: str | None = None
        self._reassembler = Reassembler(max_message_bytes=max_message_bytes)
        self._lock = threading.Lock()
        self._keepalive = keepalive
        self.connects = 0
        # A persistent session (clean_session=False, stable client id) lets the broker keep
        # our subscriptions and queue QoS 1 messages while we are briefly away.
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=mqtt.MQTTv311, clean_session=not persistent)
        self._client.max_inflight_messages_set(64)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        cred = credentials or Credentials()
        if cred.username:
            self._client.username_pw_set(cred.username, cred.password)
        if self.address.tls or cred.ca_file:
            self._client.tls_set(ca_certs=cred.ca_file, certfile=cred.cert_file,
                                 keyfile=cred.key_file, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            topic, msg = will
            payload = chunk(encode(msg), msg.msg_id)
            if len(payload) != 1:
                raise ValueError("a last will must fit in one chunk")
            self._client.will_set(topic, payload[0], qos=QOS, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._acked: set[int] = set()

    # -- paho callbacks: decode and enqueue only ------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._refused = str(reason_code)
            return
        for topic in self.subscriptions:
            client.subscribe(topic, qos=QOS)
        self.connects += 1
        if self.connects > 1:
            self.inbox.put(Incoming(RECONNECTED, None, 0))
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        if len(self._acked) > 100_000:
            self._acked.clear()
        self._acked.add(mid)

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        payload = bytes(msg.payload)
        if not payload:  # a cleared retained message
            return
        with self._lock:
            self.bytes_in += len(payload)
        try:
            with self._lock:  # the loop takes the per-topic drop counts from another thread
                seen = self._reassembler.duplicates
                data = self._reassembler.add(msg.topic, payload, kind=payload_kind(msg.topic))
            if data is None:
                if self._reassembler.duplicates > seen:  # the receiver counts it, per topic
                    self.inbox.put(Incoming(msg.topic, None, len(payload),
                                            error="a chunk or message id already received",
                                            duplicate=True))
                return
            self.inbox.put(Incoming(msg.topic, decode(data), len(data)))
        except CodecError as exc:
            self.inbox.put(Incoming(msg.topic, None, len(payload), error=str(exc)))
        except Exception as exc:  # noqa: BLE001 - never let a payload kill paho's thread
            self.inbox.put(Incoming(msg.topic, None, len(payload),
                                    error=f"undecodable payload ({type(exc).__name__}: {exc})"))

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

    # -- API ---------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> None:
        """Connect and wait for the broker's acknowledgement; paho reconnects after that."""
        try:
            self._client.connect(self.address.host, self.address.port,
                                 keepalive=self._keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(
                f"cannot reach the MQTT broker at {self.address}: {exc}; help: start a "
                "broker there (e.g. `mosquitto -p PORT`) or check --broker") from exc
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self.connected.wait(0.05):
            if self._refused or time.monotonic() > deadline:
                self.stop()
                why = self._refused or "no answer"
                raise BrokerError(f"the MQTT broker at {self.address} refused the connection "
                                  f"({why}); help: check --broker, credentials and TLS options")

    def publish(self, topic: str, msg: Message, *, retain: bool = False,
                wait: float | None = None) -> int:
        """Encode, chunk and publish at QoS 1; returns the payload bytes sent."""
        chunks = chunk(encode(msg), msg.msg_id)
        info = None
        for part in chunks:
            info = self._client.publish(topic, part, qos=QOS, retain=retain)
        n = sum(len(c) for c in chunks)
        with self._lock:
            self.bytes_out += n
        if wait is not None and info is not None:
            # paho keeps QoS 1 messages queued while disconnected and sends them after the
            # reconnect, so "not connected" is not a failure here: wait, then move on.
            deadline = time.monotonic() + wait
            while info.mid not in self._acked and time.monotonic() < deadline:
                time.sleep(0.01)
        return n

    def get(self, timeout: float | None = None) -> Incoming | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
