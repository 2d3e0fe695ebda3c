"""One real `Device` (a real ONNX Runtime session on a small digits bundle and shard) driven
by the test in the server's place over a `LoopbackBroker`: no broker process, no
subprocess. The device runs its loop in a thread; the test publishes what a server would
(its retained presence, the bundle, round starts, the stop) and reads what the device sends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.algorithms import ONNX_ALGORITHMS
from edge_runtime.bundle import GRAPH, Bundle, bundle_from_files, read_bundle_files
from edge_runtime.device import Device, DeviceOptions, device_endpoint, message_limit
from edge_runtime.protocol import (
    BundleFiles,
    Join,
    JoinProfile,
    Message,
    Presence,
    RoundStart,
    Smashed,
    Stop,
    Telemetry,
    TrainConfig,
    Update,
    server_info,
    topics,
)
from edge_runtime.transport import Incoming, payloads
from edge_runtime.transport.loopback import LoopbackBroker, LoopbackTransport
from exporter.export import export_split
from heron_data.datasets import load_dataset

P = topics.DEFAULT_PREFIX
DEV = "dev-0"
RUN = "run-a"
STEPS, EVERY = 4, 2  # per round: 4 ZO steps, smashed data at steps 0 and 2
CFG = TrainConfig(local_steps=STEPS, upload_every=EVERY, batch_size=16)
SAMPLES = 96


@dataclass(frozen=True)
class Tiny:
    """The digits CNN's device bundle (as the server sends it) and one device's shard."""

    files: dict[str, bytes]
    bundle: Bundle
    shard: Path

    @property
    def sha(self) -> str:
        return self.bundle.manifest.files[GRAPH]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    data = load_dataset("digits", seed=0)
    export_split("cnn", data.input_shape, data.num_classes, root / "bundle", seed=0)
    files = read_bundle_files(root / "bundle")
    shard = root / "shard.npz"
    np.savez(shard, x=data.x_train[:SAMPLES].astype(np.float32),
             y=data.y_train[:SAMPLES].astype(np.int64))
    return Tiny(files, bundle_from_files(files), shard)


class FakeServer:
    """The test in the server's place: a loopback client on the server's topics whose will
    is its offline presence (as `server.setup.server_endpoint` makes it)."""

    def __init__(self, broker: LoopbackBroker, tiny: Tiny, run_id: str = RUN) -> None:
        self.tiny, self.run_id = tiny, run_id
        self.t = LoopbackTransport(broker, "heron-server", topics.server_subscriptions(P),
                                   will=(topics.server_status(P),
                                         Presence(run_id, -1, "server", state="offline")))
        self.t.start()
        self.got: list[Message] = []  # from the device, not yet taken by `expect`
        self.seen: list[Message] = []  # everything from the device, in arrival order

    def online(self, cfg: TrainConfig = CFG) -> None:
        m = self.tiny.bundle.manifest
        self.t.publish(topics.server_status(P),
                       Presence(self.run_id, -1, "server", state="online",
                                info=server_info(m.model, m.cut, "digits", cfg.to_json())),
                       retain=True)

    def offline(self) -> None:
        """A clean exit (interrupted, or done): the offline presence, then goodbye."""
        self.t.publish(topics.server_status(P),
                       Presence(self.run_id, -1, "server", state="offline"), retain=True)
        self.t.stop()

    def send_bundle(self) -> None:
        names = tuple(self.tiny.files)
        self.t.publish(topics.down_device(DEV, "bundle", P),
                       BundleFiles(self.run_id, 0, "server", names=names, blobs=tuple(
                           np.frombuffer(self.tiny.files[n], dtype=np.uint8) for n in names)))

    def start_round(self, r: int, weights: np.ndarray, run_id: str | None = None,
                    participants: tuple[str, ...] = (DEV,)) -> RoundStart:
        msg = RoundStart(run_id or self.run_id, r, "server", weights=weights,
                         participants=participants, config=CFG.to_json(),
                         bundle_sha256=self.tiny.sha)
        self.t.publish(topics.down_all("round", P), msg)
        return msg

    def stop(self) -> None:
        self.t.publish(topics.down_all("stop", P),
                       Stop(self.run_id, 0, "server", reason="finished"))

    def _take(self, timeout: float) -> None:
        inc = self.t.get(timeout=timeout)
        if inc is not None and inc.message is not None:
            assert inc.message.sender == DEV, inc
            self.got.append(inc.message)
            self.seen.append(inc.message)

    def expect(self, kind: str, timeout: float = 60.0) -> Any:
        """The device's next message of `kind` (others wait for their own `expect`)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.got):
                if m.kind == kind:
                    return self.got.pop(i)
            left = deadline - time.monotonic()
            assert left > 0, f"no {kind} from the device; got {[m.kind for m in self.seen]}"
            self._take(min(left, 0.5))

    def settle(self, s: float = 0.5) -> None:
        """Take what the device sends within `s` seconds."""
        end = time.monotonic() + s
        while (left := end - time.monotonic()) > 0:
            self._take(left)

    def sent(self, kind: str) -> list[Any]:
        return [m for m in self.seen if m.kind == kind]


class Spy(LoopbackTransport):
    """The device's transport, keeping what the device published and what it was handed;
    `on_publish` runs after each publish (to act at a precise point of a round)."""

    on_publish: Callable[[Message], None] | None = None

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.published: list[Message] = []
        self.threads: list[str] = []  # the thread each of `published` came from
        self.handed: list[Incoming] = []

    def publish(self, topic: str, msg: Message, **kw: Any) -> int:
        n = super().publish(topic, msg, **kw)
        self.published.append(msg)
        self.threads.append(threading.current_thread().name)
        if self.on_publish is not None:
            self.on_publish(msg)
        return n

    def get(self, timeout: float | None = None) -> Incoming | None:
        inc = super().get(timeout)
        if inc is not None:
            self.handed.append(inc)
        return inc


class Running:
    """A Device in a thread on the broker, as `heron device` runs one."""

    def __init__(self, broker: LoopbackBroker, tiny: Tiny, root: Path,
                 wait_server_s: float = 60.0) -> None:
        opts = DeviceOptions(broker="loopback", device_id=DEV, data=tiny.shard, threads=1,
                             bundle_cache=root / "cache", wait_server_s=wait_server_s)
        ep = device_endpoint(DEV, P)
        self.t = Spy(broker, ep.client_id, ep.subscriptions, will=ep.will,
                     max_message_bytes=message_limit(None))
        self.device = Device(opts, self.t)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.device.run()

    def exit_code(self, timeout: float = 30.0) -> int | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the device did not end"
        return self.code


@pytest.fixture
def broker() -> Iterator[LoopbackBroker]:
    yield LoopbackBroker()


def ready(server: FakeServer, tiny: Tiny) -> Join:
    """Announce the run, answer the device's first join with the bundle; its ready join."""
    server.online()
    first = server.expect("join")
    assert first.bundle_sha256 is None  # no bundle yet: it asks for one
    server.send_bundle()
    join: Join = server.expect("join")
    assert join.bundle_sha256 == tiny.sha
    return join


def round_trip(server: FakeServer, r: int, weights: np.ndarray) -> Update:
    server.start_round(r, weights)
    update: Update = server.expect("update")
    assert update.round == r
    return update


# -- (a) a normal round --------------------------------------------------------------------------
def test_a_round_joins_takes_the_bundle_trains_and_uploads(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    dev = Running(broker, tiny, tmp_path)
    server = FakeServer(broker, tiny)
    assert server.expect("presence").state == "online"  # its retained status
    server.online()
    join = server.expect("join")
    assert join.run_id == RUN and join.bundle_sha256 is None
    assert isinstance(join.profile, JoinProfile)
    assert join.profile.samples == SAMPLES and join.profile.algorithms == ONNX_ALGORITHMS
    assert join.profile.budget_mb is None  # nothing to measure before the bundle
    server.send_bundle()
    ready = server.expect("join")
    assert ready.bundle_sha256 == tiny.sha  # "ready", with the memory check at the run's batch
    assert ready.profile.memory_batch == CFG.batch_size and ready.profile.budget_mb > 0
    assert ready.profile.max_batch_measured_fit == CFG.batch_size

    weights = tiny.bundle.weights
    server.start_round(1, weights)
    update: Update = server.expect("update")
    smashed: list[Smashed] = server.sent("smashed")
    assert [s.step for s in smashed] == list(range(0, STEPS, EVERY))
    for s in smashed:
        assert (s.run_id, s.round) == (RUN, 1)
        assert s.activations.shape == (CFG.batch_size, *tiny.bundle.manifest.smashed_shape)
        assert s.labels.shape == (CFG.batch_size,)
    assert (update.run_id, update.round, update.num_samples) == (RUN, 1, SAMPLES)
    assert update.weights.shape == weights.shape and update.weights.dtype == np.float32
    assert np.all(np.isfinite(update.weights)) and not np.array_equal(update.weights, weights)
    tel = update.telemetry
    assert isinstance(tel, Telemetry)
    assert (tel.steps, tel.smashed_sent, tel.algorithm) == (STEPS, STEPS // EVERY, "heron")
    assert tel.bytes_in == 0  # heron asks nothing of the server mid-round
    assert tel.bytes_out >= sum(s.activations.nbytes for s in smashed)  # the smashed uploads
    # coded and published on the uplink thread, every one of them before the update
    kinds = [(m.kind, th) for m, th in zip(dev.t.published, dev.t.threads, strict=True)]
    assert {th for k, th in kinds if k == "smashed"} == {"heron-uplink"}
    last_smashed = max(i for i, (k, _) in enumerate(kinds) if k == "smashed")
    assert kinds.index(("update", dev.thread.name)) > last_smashed

    server.stop()
    assert dev.exit_code() == 0
    assert dev.device.rounds_done == 1 and dev.device.ignored == {}
    server.settle(0.1)
    assert server.sent("presence")[-1].state == "offline"  # it says goodbye
    assert len(server.sent("update")) == 1


def test_a_device_with_no_server_gives_up(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    dev = Running(broker, tiny, tmp_path, wait_server_s=0.5)
    assert dev.exit_code(timeout=10) == 3
    assert dev.device.run_id is None and dev.device.rounds_done == 0


# -- (b) the server drops and comes back --------------------------------------------------------
def test_a_server_that_drops_mid_round_and_asks_again_gets_the_same_update(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    dev = Running(broker, tiny, tmp_path)
    server = FakeServer(broker, tiny)
    ready(server, tiny)

    dropped, uploaded = threading.Event(), threading.Event()

    def crash(msg: Message) -> None:  # the server dies at the round's first smashed batch
        if isinstance(msg, Smashed) and not dropped.is_set():
            server.t.drop()  # the broker publishes its will: the offline presence
            dropped.set()
        if isinstance(msg, Update):
            uploaded.set()
    dev.t.on_publish = crash
    server.start_round(1, tiny.bundle.weights)
    assert dropped.wait(60) and uploaded.wait(60)
    assert server.sent("update") == []  # the server was gone before the round ended
    back = FakeServer(broker, tiny)  # restarted, the same run
    back.online()
    rejoin = back.expect("join")
    assert rejoin.run_id == RUN and rejoin.bundle_sha256 == tiny.sha  # no bundle needed
    first = [m for m in dev.t.published if isinstance(m, Update)]
    assert len(first) == 1 and first[0].round == 1  # sent while no server listened
    again = round_trip(back, 1, tiny.bundle.weights)  # the restarted server asks again
    np.testing.assert_array_equal(again.weights, first[0].weights)
    assert again.msg_id != first[0].msg_id  # a new publication: the receiver dedupes by id
    assert back.sent("smashed") == []  # resent, not trained again
    back.stop()
    assert dev.exit_code() == 0
    assert dev.device.rounds_done == 1 and dev.device.ignored == {}


def test_while_its_server_is_away_the_device_obeys_no_round_then_rejoins(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    dev = Running(broker, tiny, tmp_path)
    server = FakeServer(broker, tiny)
    ready(server, tiny)
    u1 = round_trip(server, 1, tiny.bundle.weights)
    server.t.drop()  # between rounds: its will says offline
    back = FakeServer(broker, tiny)
    back.start_round(2, u1.weights)  # before its presence: the device is in no run now
    back.settle(0.5)
    assert back.sent("update") == [] and back.sent("smashed") == []
    back.online()
    assert back.expect("join").bundle_sha256 == tiny.sha
    u2 = round_trip(back, 2, u1.weights)
    assert len(back.sent("smashed")) == STEPS // EVERY
    back.stop()
    assert dev.exit_code() == 0
    assert dev.device.rounds_done == 2 and len(back.sent("update")) == 1
    assert dev.device.ignored == {"round for another run": 1}
    assert not np.array_equal(u2.weights, u1.weights)


def test_the_devices_own_link_drops_and_it_announces_itself_again(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    dev = Running(broker, tiny, tmp_path)
    server = FakeServer(broker, tiny)
    ready(server, tiny)
    assert server.expect("presence").state == "online"
    dev.t.drop()  # the broker publishes the device's will
    assert server.expect("presence").state == "offline"
    dev.t.reconnect()  # as paho after an outage: the loop is told, and re-announces
    assert server.expect("presence").state == "online"
    rejoin = server.expect("join")
    assert rejoin.run_id == RUN and rejoin.bundle_sha256 == tiny.sha
    round_trip(server, 1, tiny.bundle.weights)
    server.stop()
    assert dev.exit_code() == 0 and dev.device.rounds_done == 1


# -- (c) stale and duplicate messages -----------------------------------------------------------
def test_a_redelivered_round_start_and_another_runs_round_train_nothing(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    dev = Running(broker, tiny, tmp_path)
    server = FakeServer(broker, tiny)
    ready(server, tiny)
    start = server.start_round(1, tiny.bundle.weights)
    u1 = server.expect("update")
    for part in payloads(start):  # a QoS 1 redelivery: the same message id
        server.t.publish_raw(topics.down_all("round", P), part)
    server.start_round(2, u1.weights, run_id="run-old")  # a stale run's round
    u2 = round_trip(server, 2, u1.weights)
    server.stop()
    assert dev.exit_code() == 0
    assert [u.round for u in server.sent("update")] == [1, 2]  # one update per round
    assert len(server.sent("smashed")) == 2 * (STEPS // EVERY)
    assert dev.device.rounds_done == 2
    assert dev.device.ignored == {"round for another run": 1}
    duplicates = [inc for inc in dev.t.handed if inc.duplicate]
    assert len(duplicates) == 1 and duplicates[0].topic == topics.down_all("round", P)
    assert u2.msg_id != u1.msg_id


def test_a_round_not_naming_the_device_is_not_trained(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    dev = Running(broker, tiny, tmp_path)
    server = FakeServer(broker, tiny)
    ready(server, tiny)
    server.start_round(1, tiny.bundle.weights, participants=("dev-1",))
    round_trip(server, 2, tiny.bundle.weights)
    server.stop()
    assert dev.exit_code() == 0
    assert [u.round for u in server.sent("update")] == [2] and dev.device.rounds_done == 1


# -- (d) resume ---------------------------------------------------------------------------------
def test_a_resumed_server_of_the_same_run_gets_its_later_round_trained(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    dev = Running(broker, tiny, tmp_path)
    server = FakeServer(broker, tiny)
    ready(server, tiny)
    u1 = round_trip(server, 1, tiny.bundle.weights)
    u2 = round_trip(server, 2, u1.weights)
    server.offline()  # interrupted after checkpointing round 2: no stop for the devices
    resumed = FakeServer(broker, tiny)
    resumed.online()
    rejoin = resumed.expect("join")
    assert rejoin.run_id == RUN and rejoin.bundle_sha256 == tiny.sha
    u3 = round_trip(resumed, 3, u2.weights)
    assert len(resumed.sent("smashed")) == STEPS // EVERY
    assert not np.array_equal(u3.weights, u2.weights)
    resumed.stop()
    assert dev.exit_code() == 0
    assert dev.device.rounds_done == 3 and dev.device.ignored == {}
    assert dev.device.run_id == RUN


def test_a_server_resumed_from_an_earlier_round_has_it_trained_again(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    """The device keeps only its last update: a round before it, asked by a server of the
    same run with a new message, is trained from the weights given (the server is the one
    that refuses stale uploads)."""
    dev = Running(broker, tiny, tmp_path)
    server = FakeServer(broker, tiny)
    ready(server, tiny)
    u1 = round_trip(server, 1, tiny.bundle.weights)
    round_trip(server, 2, u1.weights)
    server.t.drop()
    resumed = FakeServer(broker, tiny)
    resumed.online()
    resumed.expect("join")
    again = round_trip(resumed, 1, tiny.bundle.weights)
    assert len(resumed.sent("smashed")) == STEPS // EVERY  # trained, not resent
    np.testing.assert_array_equal(again.weights, u1.weights)  # same seed, same weights
    resumed.stop()
    assert dev.exit_code() == 0 and dev.device.rounds_done == 3


def test_a_round_whose_memory_check_fails_is_reported_and_the_device_goes_on(
        broker: LoopbackBroker, tiny: Tiny, tmp_path: Path) -> None:
    """The round's memory check is a real step at its weights, coded under its codec: if
    that step fails (here float16 cannot carry the activations of weights x 1e5), the round
    is refused with the reason, and the next round trains."""
    from dataclasses import replace

    dev = Running(broker, tiny, tmp_path)
    server = FakeServer(broker, tiny)
    ready(server, tiny)  # measured up to CFG's batch 16; batch 32 is a new probe
    bad_cfg = replace(CFG, batch_size=32, smashed_codec="fp16")
    big = (tiny.bundle.weights * np.float32(1e5)).astype(np.float32)
    server.t.publish(topics.down_all("round", P),
                     RoundStart(RUN, 1, "server", weights=big, participants=(DEV,),
                                config=bad_cfg.to_json(), bundle_sha256=tiny.sha))
    err = server.expect("error")
    assert "round 1 rejected: its memory check failed" in err.error and "float16" in err.error
    u2 = round_trip(server, 2, tiny.bundle.weights)
    assert u2.round == 2 and not server.sent("update")[:-1]  # round 1 sent no update
    server.stop()
    assert dev.exit_code() == 0 and dev.device.rounds_done == 1
