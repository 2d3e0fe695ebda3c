"""The one adapter between heron and paho-mqtt: paho types never leave this module.

Callbacks only reassemble, decode and enqueue; the caller's loop pulls `Incoming` items
from a queue. Subscriptions are (re)made in on_connect so a reconnect resubscribes.

Two ways to drive a client's network I/O:

- `loop_start()` (the default, `heron device` and the server): paho's own thread per
  client, which also reconnects.
- `shared_loop=True` (`heron devices host`): one `NetworkLoop` thread per process
  multiplexes every such client's socket with `selectors`, through paho's external-loop API
  (`loop_read`/`loop_write`/`loop_misc` and the socket callbacks). A host of hundreds of
  devices then has one network thread instead of one per device: with a thread each, 1,000
  devices in four processes meant 1,000 network threads contending for four GILs, and
  clients missed their keepalives (BENCHMARKS.md, the fleet section). The loop does what
  `loop_start` does for us: pings and keepalive timeouts (`loop_misc` every
  `MISC_INTERVAL_S`) and reconnects with the same backoff (1 s doubling to 10 s).
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

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
           "NetworkLoop", "RECONNECTED"]

log = logging.getLogger("heron.transport")

MISC_INTERVAL_S = 1.0  # how often the shared loop runs each client's keepalive check
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 10.0  # as `reconnect_delay_set` below


@dataclass(eq=False)
class _Managed:
    """One client on the shared loop, with its reconnect schedule."""

    client: mqtt.Client
    sock: socket.socket | None = None  # registered with the selector
    next_try: float | None = None  # when to reconnect, once the socket is gone
    delay: float = RECONNECT_MIN_S
    stopping: bool = False  # asked to disconnect: never reconnect


class NetworkLoop:
    """One thread that drives the network I/O of many paho clients (module doc).

    paho calls the socket callbacks on the thread that causes them: the loop's own (reads,
    writes, keepalive, reconnects) or a publisher's (`publish` asks to write). Only the
    loop thread touches the selector: other threads queue a call and wake it through a
    socket pair. Connects and disconnects run on the loop thread too.
    """

    _shared: NetworkLoop | None = None
    _shared_lock = threading.Lock()

    def __init__(self, name: str = "mqtt-network") -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: list[Callable[[], None]] = []
        self._calls_lock = threading.Lock()
        self._clients: dict[mqtt.Client, _Managed] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> NetworkLoop:
        """The process's loop, started on first use."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared._closed:
                cls._shared = cls()
            return cls._shared

    @property
    def clients(self) -> int:
        return len(self._clients)

    # -- called from any thread ------------------------------------------------------------
    def call(self, fn: Callable[[], object], timeout: float | None = None) -> object:
        """Run `fn` on the loop thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: dict[str, object] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box["error"] = exc
            done.set()

        self._post(run)
        if not done.wait(timeout):
            raise TimeoutError("the MQTT network loop did not answer in time")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box.get("result")

    def _post(self, fn: Callable[[], None]) -> None:
        with self._calls_lock:
            first = not self._calls
            self._calls.append(fn)
        if first:
            try:
                self._wake_w.send(b"x")
            except (BlockingIOError, OSError):
                pass  # already awake (a full pipe) or closing

    def _on_loop(self, fn: Callable[[], None]) -> None:
        if threading.current_thread() is self._thread:
            fn()
        else:
            self._post(fn)

    def connect(self, client: mqtt.Client, host: str, port: int, keepalive: int) -> None:
        """Drive `client` from this loop and connect it; paho's `connect` runs on the loop
        thread, so its socket callbacks register the socket there. If it raises, the client
        is not kept (nothing would reconnect a client that never connected)."""
        entry = _Managed(client)
        client.on_socket_open = lambda c, u, sock: self._on_loop(lambda: self._opened(entry, sock))
        client.on_socket_close = lambda c, u, sock: self._on_loop(lambda: self._unregister(entry))
        client.on_socket_register_write = lambda c, u, sock: self._on_loop(
            lambda: self._interest(entry))
        client.on_socket_unregister_write = lambda c, u, sock: self._on_loop(
            lambda: self._interest(entry))

        def run() -> None:
            try:
                client.connect(host, port, keepalive=keepalive)
            except BaseException:
                self._forget(entry)
                raise
            self._clients[client] = entry

        self.call(run)

    def detach(self, client: mqtt.Client, timeout: float = 5.0) -> None:
        """Disconnect `client` cleanly (its DISCONNECT written) and stop driving it. Never
        raises for a busy loop: a stop must not fail the device (in the 1,000-device bench
        one of 250 devices stopping at once waited over 5 s for the loop); the client is
        then forgotten when the loop gets to it, and the broker sees the socket close."""
        entry = self._clients.get(client)
        if entry is None:
            return
        entry.stopping = True  # never reconnected from here on

        def begin() -> None:
            if entry.sock is not None:
                client.disconnect()  # written by the loop; paho closes the socket after it

        try:
            self.call(begin, timeout)
            deadline = time.monotonic() + timeout
            while entry.sock is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            self.call(lambda: self._forget(entry), timeout)
        except TimeoutError:  # the queued calls still run, later
            log.warning("MQTT network loop busy: %s left without waiting for its disconnect",
                        client._client_id.decode(errors="replace"))
            self._post(lambda: self._forget(entry))

    # -- the loop thread -------------------------------------------------------------------
    def _opened(self, entry: _Managed, sock: socket.socket) -> None:
        if entry.sock is not None:
            self._unregister(entry)
        entry.sock = sock
        self._sel.register(sock, selectors.EVENT_READ, entry)
        self._interest(entry)

    def _unregister(self, entry: _Managed) -> None:
        if entry.sock is not None:
            try:
                self._sel.unregister(entry.sock)
            except (KeyError, ValueError, OSError):
                pass
            entry.sock = None

    def _interest(self, entry: _Managed) -> None:
        """Read always; write while paho has bytes queued. Decided from `want_write()` here,
        not from which callback came: a publish between paho's check and its unregister
        call would otherwise leave its packet unsent."""
        if entry.sock is None:
            return
        events = selectors.EVENT_READ
        if entry.client.want_write():
            events |= selectors.EVENT_WRITE
        try:
            if self._sel.get_key(entry.sock).events != events:
                self._sel.modify(entry.sock, events, entry)
        except (KeyError, ValueError, OSError):
            pass

    def _forget(self, entry: _Managed) -> None:
        self._unregister(entry)
        self._clients.pop(entry.client, None)

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            try:
                fn()
            except Exception:  # noqa: BLE001 - one client's failure must not end the loop
                log.exception("MQTT network loop: a queued call failed")

    def _misc(self, now: float) -> None:
        """Keepalive for the connected; reconnect the dropped, when their backoff is up."""
        for entry in list(self._clients.values()):
            client = entry.client
            if entry.stopping:
                continue
            if entry.sock is not None:
                if client.is_connected():
                    entry.delay = RECONNECT_MIN_S
                try:
                    client.loop_misc()
                except Exception:  # noqa: BLE001 - one client's failure must not end the loop
                    log.exception("MQTT network loop: a client's keepalive check failed")
                if entry.sock is not None and client.want_write():
                    self._interest(entry)  # a safety net for a missed register call
                continue
            if entry.next_try is None:
                entry.next_try = now + entry.delay
            elif now >= entry.next_try:
                entry.next_try = None
                try:
                    client.reconnect()
                except Exception as exc:  # noqa: BLE001 - refused, unreachable: try again later
                    log.debug("MQTT reconnect failed: %s", exc)
                    entry.delay = min(entry.delay * 2, RECONNECT_MAX_S)
                    entry.next_try = now + entry.delay

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL_S
        while not self._closed:
            timeout = max(0.0, next_misc - time.monotonic())
            for key, mask in self._sel.select(timeout):
                entry = key.data
                if entry is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                try:
                    self._io(entry, key.fileobj, mask)
                except Exception:  # noqa: BLE001 - paho raised; the client reconnects
                    log.exception("MQTT network loop: a client's I/O failed")
            self._run_calls()
            now = time.monotonic()
            if now >= next_misc:
                self._misc(now)
                next_misc = now + MISC_INTERVAL_S

    def _io(self, entry: _Managed, sock: object, mask: int) -> None:
        client = entry.client
        if mask & selectors.EVENT_READ and entry.sock is sock:
            client.loop_read()
            # TLS may hold decrypted bytes the selector cannot see
            while entry.sock is sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
                client.loop_read()
        if mask & selectors.EVENT_WRITE and entry.sock is sock:
            client.loop_write()
        if entry.sock is sock:
            self._interest(entry)

    def close(self) -> None:
        """Stop the thread (the clients still attached are left as they are)."""
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


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
        shared_loop: bool | NetworkLoop = False,
    ) -> None:
        """`max_message_bytes`: larger incoming messages are refused at their first chunk
        (a device passes what its memory budget can hold). `shared_loop`: drive this client
        from the process's `NetworkLoop` (or the one given) instead of a thread of its own."""
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
        self._network: NetworkLoop | None = None
        if shared_loop:
            self._network = (shared_loop if isinstance(shared_loop, NetworkLoop)
                             else NetworkLoop.shared())

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
            if self._network is not None:
                self._network.connect(self._client, self.address.host, self.address.port,
                                      self._keepalive)
            else:
                self._client.connect(self.address.host, self.address.port,
                                     keepalive=self._keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(
                f"cannot reach the MQTT broker at {self.address}: {exc}; help: start a "
                "broker there (e.g. `mosquitto -p PORT`) or check --broker") from exc
        if self._network is None:
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
        if self._network is not None:
            self._network.detach(self._client)
            return
        self._client.disconnect()
        self._client.loop_stop()
