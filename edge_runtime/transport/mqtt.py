"""The one adapter between heron and paho-mqtt: paho types never leave this module.

Callbacks only reassemble, decode and enqueue; the caller's loop pulls `Incoming` items
from a queue. Subscriptions are (re)made in on_connect so a reconnect resubscribes.
"""

from __future__ import annotations

import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_runtime.protocol import MAX_MESSAGE_BYTES, Message
from edge_runtime.transport import (
    QOS,
    RECONNECTED,
    BrokerAddress,
    BrokerError,
    Credentials,
    Incoming,
    Receiver,
    payloads,
)

__all__ = ["BrokerAddress", "BrokerError", "Credentials", "Incoming", "MqttTransport",
           "RECONNECTED"]


class MqttTransport(Receiver):
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
        super().__init__(max_message_bytes)
        self.connected = threading.Event()
        self._refused: str | None = None
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
            payload = payloads(msg)
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
        self._receive(msg.topic, bytes(msg.payload))

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
        chunks = payloads(msg)
        info = None
        for part in chunks:
            info = self._client.publish(topic, part, qos=QOS, retain=retain)
        n = sum(len(c) for c in chunks)
        self._sent(n, msg.kind)
        if wait is not None and info is not None:
            # paho keeps QoS 1 messages queued while disconnected and sends them after the
            # reconnect, so "not connected" is not a failure here: wait, then move on.
            deadline = time.monotonic() + wait
            while info.mid not in self._acked and time.monotonic() < deadline:
                time.sleep(0.01)
        return n


    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
