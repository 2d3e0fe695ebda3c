"""An in-process broker and transport: the server and device loops in one process, no
network, so a whole round runs in a test in well under a second of messaging.

It keeps the MQTT semantics the loops rely on: topic filters with + and # (paho's
`topic_matches_sub`), retained messages delivered on subscribe (an empty payload clears
one), one copy per matching subscriber, and the last will: a client that goes away without
a clean `stop` (`drop`) has its will published, retained, as the broker would after a
missed keepalive. Messages travel as the same chunks as over MQTT and are reassembled and
decoded by the same `Receiver`, so the codec's limits and the duplicate accounting apply.
Delivery is synchronous, on the publisher's thread, in publish order.
"""

from __future__ import annotations

import itertools
import threading

from paho.mqtt.client import topic_matches_sub

from edge_runtime.protocol import MAX_MESSAGE_BYTES, Message
from edge_runtime.transport import RECONNECTED, Endpoint, Incoming, Receiver, payloads

_names = itertools.count()


class LoopbackBroker:
    """Shared by the `LoopbackTransport`s of one test: routes, retains, sends wills."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"broker-{next(_names)}"
        self._clients: dict[str, LoopbackTransport] = {}
        self._retained: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self.published = 0  # payloads routed (chunks), for tests

    def connect(self, client: LoopbackTransport) -> None:
        with self._lock:
            old = self._clients.get(client.client_id)
            if old is not None and old is not client:  # session takeover: the old one goes
                old.connected = False
            self._clients[client.client_id] = client
            client.connected = True
            retained = [(t, p) for t, p in self._retained.items()
                        if client.subscribed(t)]
        for topic, payload in retained:
            client._receive(topic, payload)

    def disconnect(self, client: LoopbackTransport, *, clean: bool) -> None:
        with self._lock:
            if self._clients.get(client.client_id) is client:
                del self._clients[client.client_id]
            was = client.connected
            client.connected = False
        if was and not clean and client.will is not None:
            topic, payload = client.will
            self.route(topic, payload, retain=True)

    def route(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Deliver one payload to every connected client with a matching subscription."""
        with self._lock:
            self.published += 1
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            targets = [c for c in self._clients.values() if c.subscribed(topic)]
            for client in targets:  # under the lock: publish order is delivery order
                client._receive(topic, payload)

    def retained(self, topic: str) -> bytes | None:
        with self._lock:
            return self._retained.get(topic)


class LoopbackTransport(Receiver):
    """A `Transport` on a `LoopbackBroker`. `drop` ends it as a crash would (the will is
    published); `reconnect` brings it back as paho does after a broker outage."""

    def __init__(self, broker: LoopbackBroker, client_id: str, subscriptions: list[str], *,
                 will: tuple[str, Message] | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        super().__init__(max_message_bytes)
        self.broker = broker
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.address = f"loopback://{broker.name}"
        self.connected = False
        self.will: tuple[str, bytes] | None = None
        if will is not None:
            topic, msg = will
            parts = payloads(msg)
            if len(parts) != 1:
                raise ValueError("a last will must fit in one chunk")
            self.will = (topic, parts[0])

    @classmethod
    def at(cls, broker: LoopbackBroker, endpoint: Endpoint,
           max_message_bytes: int = MAX_MESSAGE_BYTES) -> LoopbackTransport:
        return cls(broker, endpoint.client_id, endpoint.subscriptions, will=endpoint.will,
                   max_message_bytes=max_message_bytes)

    def subscribed(self, topic: str) -> bool:
        return any(topic_matches_sub(f, topic) for f in self.subscriptions)

    def start(self, timeout: float = 15.0) -> None:
        self.broker.connect(self)

    def publish(self, topic: str, msg: Message, *, retain: bool = False,
                wait: float | None = None) -> int:
        """As MqttTransport.publish; while dropped, the payloads are lost (paho would queue
        them, but a dropped loopback client never comes back on its own)."""
        parts = payloads(msg)
        if self.connected:
            for part in parts:
                self.broker.route(topic, part, retain=retain)
        n = sum(len(p) for p in parts)
        self._sent(n, msg.kind)
        return n

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """A payload as given (a hostile or broken sender), for tests."""
        if self.connected:
            self.broker.route(topic, payload, retain=retain)

    def stop(self) -> None:
        self.broker.disconnect(self, clean=True)

    def drop(self) -> None:
        """The link is gone without a goodbye: the broker publishes the will."""
        self.broker.disconnect(self, clean=False)

    def reconnect(self) -> None:
        """Back after a drop: subscriptions are made again and the loop is told."""
        self.broker.connect(self)
        self.inbox.put(Incoming(RECONNECTED, None, 0))
