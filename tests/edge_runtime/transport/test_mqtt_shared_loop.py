"""`MqttTransport(shared_loop=...)`: many clients driven by one `NetworkLoop` thread behave
as `loop_start` clients do: connect, subscribe, chunked messages both ways, keepalive,
reconnect and resubscribe after a broker restart, a clean stop (no last will)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import RestartableMosquitto as Broker
from conftest import free_port

from edge_runtime.protocol import MAX_CHUNK_PAYLOAD, BundleFiles, Presence, topics
from edge_runtime.transport import RECONNECTED, BrokerError, Incoming
from edge_runtime.transport.mqtt import MqttTransport, NetworkLoop

pytestmark = pytest.mark.broker

N = 5


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, log=True)
    b.start()
    yield b
    b.kill()


@pytest.fixture
def loop() -> Iterator[NetworkLoop]:
    lp = NetworkLoop(name="test-mqtt-network")
    yield lp
    lp.close()


def dev(i: int) -> str:
    return f"dev-{i}"


def clients(url: str, loop: NetworkLoop, n: int = N, **kw: object) -> list[MqttTransport]:
    out = []
    for i in range(n):
        t = MqttTransport(url, f"heron-{dev(i)}", topics.device_subscriptions(dev(i)),
                          shared_loop=loop, **kw)  # type: ignore[arg-type]
        t.start()
        out.append(t)
    return out


def wait_for(t: MqttTransport, topic: str, timeout: float = 15.0) -> Incoming:
    """The next item on `topic` (skipping others, e.g. RECONNECTED)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inc = t.get(timeout=0.2)
        if inc is not None and inc.topic == topic:
            return inc
    raise AssertionError(f"nothing on {topic} within {timeout} s")


def big_bundle(i: int) -> BundleFiles:
    # 2.5 chunks of random bytes: reassembly from 3 payloads, and incompressible
    blob = np.random.default_rng(i).integers(0, 256, int(2.5 * MAX_CHUNK_PAYLOAD), np.uint8)
    return BundleFiles("run", 0, "server", names=("blob.bin",), blobs=(blob,))


def exchange(server: MqttTransport, devs: list[MqttTransport]) -> None:
    """The server sends each device its own multi-chunk bundle; each device answers with a
    presence; every payload arrives whole and unchanged."""
    sent = {}
    for i in range(len(devs)):
        msg = sent[i] = big_bundle(i)
        assert server.publish(topics.down_device(dev(i), "bundle"), msg) > MAX_CHUNK_PAYLOAD
    for i, t in enumerate(devs):
        inc = wait_for(t, topics.down_device(dev(i), "bundle"))
        assert inc.error is None, inc.error
        got = inc.message
        assert isinstance(got, BundleFiles) and got.msg_id == sent[i].msg_id
        assert got.files() == sent[i].files()
        t.publish(topics.device_status(dev(i)), Presence("run", 0, dev(i), state="online"))
    # the devices' connections are independent: their presences arrive in any order
    want = {topics.device_status(dev(i)): dev(i) for i in range(len(devs))}
    deadline = time.monotonic() + 15.0
    while want and time.monotonic() < deadline:
        inc = server.get(timeout=0.2)
        if inc is not None and inc.topic in want:
            assert isinstance(inc.message, Presence)
            assert inc.message.sender == want.pop(inc.topic)
    assert not want, f"no presence from {sorted(want.values())} within 15 s"


def test_many_clients_share_one_network_thread_and_exchange_chunked_messages(
        broker: Broker, loop: NetworkLoop) -> None:
    before = threading.active_count()
    devs = clients(broker.url, loop)
    server = MqttTransport(broker.url, "heron-server", topics.server_subscriptions(),
                           shared_loop=loop)
    server.start()
    try:
        # loop_start would have added a thread per client: N + 1 here
        assert threading.active_count() == before
        assert loop.clients == N + 1
        exchange(server, devs)
    finally:
        for t in [*devs, server]:
            t.stop()
    assert loop.clients == 0


def test_shared_loop_clients_reconnect_and_resubscribe_after_a_broker_restart(
        broker: Broker, loop: NetworkLoop) -> None:
    devs = clients(broker.url, loop)
    server = MqttTransport(broker.url, "heron-server", topics.server_subscriptions(),
                           shared_loop=loop)
    server.start()
    try:
        broker.kill()
        time.sleep(1.5)  # at least one failed reconnect each: the backoff path
        broker.start()  # no persistence: every subscription is gone with the old broker
        for t in [*devs, server]:
            assert wait_for(t, RECONNECTED, timeout=30).message is None
            assert t.connected.wait(10) and t.connects == 2
        exchange(server, devs)  # delivered again: on_connect resubscribed
    finally:
        for t in [*devs, server]:
            t.stop()


def test_shared_loop_pings_for_an_idle_client(broker: Broker, loop: NetworkLoop) -> None:
    # paho pings only from loop_misc, which the shared loop must call (loop_start did)
    (t,) = clients(broker.url, loop, n=1, keepalive=1)
    try:
        time.sleep(3.5)  # 3 keepalives without a message of ours
        assert t.connected.is_set() and t.connects == 1
        assert t.get(timeout=0) is None  # no RECONNECTED
        pings = broker.log.read_text().count(f"Received PINGREQ from heron-{dev(0)}")
        assert pings >= 2, broker.log.read_text()[-2000:]
    finally:
        t.stop()


def test_shared_loop_stop_is_a_clean_disconnect_without_the_last_will(
        broker: Broker, loop: NetworkLoop) -> None:
    watcher = MqttTransport(broker.url, "heron-server", [topics.device_status(dev(0))],
                            shared_loop=loop)
    watcher.start()
    will = (topics.device_status(dev(0)), Presence("", -1, dev(0), state="offline"))
    t = MqttTransport(broker.url, f"heron-{dev(0)}", [], will=will, shared_loop=loop)
    t.start()
    t.stop()
    try:
        assert watcher.get(timeout=2.0) is None  # a will would arrive within milliseconds
        assert loop.clients == 1
    finally:
        watcher.stop()


def test_shared_loop_connect_failure_is_a_broker_error_and_leaves_nothing_behind(
        loop: NetworkLoop) -> None:
    t = MqttTransport(f"mqtt://127.0.0.1:{free_port()}", "heron-x", [], shared_loop=loop)
    with pytest.raises(BrokerError, match="cannot reach"):
        t.start()
    assert loop.clients == 0


def test_stop_on_a_busy_loop_does_not_raise_and_the_client_is_dropped_later(
        broker: Broker, loop: NetworkLoop) -> None:
    # at the 1,000-device bench's end one device's stop raised TimeoutError on a busy loop
    (t,) = clients(broker.url, loop, n=1)
    release = threading.Event()
    loop._post(lambda: release.wait(10))  # the loop thread is stuck until released
    t._network.detach(t._client, timeout=0.3)  # type: ignore[union-attr]
    assert loop.clients == 1  # not yet: the loop has not got to it
    release.set()
    deadline = time.monotonic() + 5
    while loop.clients and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop.clients == 0
