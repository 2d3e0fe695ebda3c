"""`--device-sync replay` on a real short federation over the loopback transport: every
round, the weights the server replays from each device's log are the device's own, bit for
bit; a log that does not replay to its hash is never averaged: the server asks the device
for its weights (the fallback) and averages those, or drops the update at the deadline; a
malformed log is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_loop_inprocess import Fleet

import server.loop
from edge_runtime.device import Device
from edge_runtime.protocol import Message, Update, WeightsReply, encode
from edge_runtime.runtime import RoundResult
from edge_runtime.transport import payloads
from edge_runtime.transport.loopback import LoopbackTransport
from server.replay import Replayed


def _replay_fleet(root: Path, **kw: Any) -> Fleet:
    fleet = Fleet(root, **kw)
    fleet.opts = dataclasses.replace(
        fleet.opts, train=dataclasses.replace(fleet.opts.train, device_sync="replay"))
    return fleet


def test_replayed_weights_are_the_devices_own_every_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: dict[tuple[int, str], np.ndarray] = {}
    replayed: dict[tuple[int, str], np.ndarray] = {}
    sent: list[Update] = []
    train, replay = Device._train, server.loop.replay_update

    def device_train(self: Device, msg: Any, cfg: Any, send: Any) -> RoundResult:
        result = train(self, msg, cfg, send)
        trained[(msg.round, self.opts.device_id)] = result.theta.copy()
        return result

    def server_replay(msg: Update, start: np.ndarray, cfg: Any, manifest: Any, round_idx: int,
                      device_id: str) -> Replayed:
        sent.append(msg)
        got = replay(msg, start, cfg, manifest, round_idx, device_id)
        assert got.weights is not None, got.rejected
        replayed[(round_idx, device_id)] = got.weights
        return got

    monkeypatch.setattr(Device, "_train", device_train)
    monkeypatch.setattr(server.loop, "replay_update", server_replay)
    fleet = _replay_fleet(tmp_path, rounds=2)
    run, srv = fleet.server()
    fleet.start_devices(run, 3)
    summary = fleet.run(srv)
    assert summary["completed_rounds"] == 2 and summary["rejected"] == {}
    assert set(replayed) == set(trained) == {(r, f"dev-{i}") for r in (1, 2) for i in range(3)}
    for key, theta in trained.items():  # bit for bit: no tolerance (edge_runtime.replay)
        np.testing.assert_array_equal(replayed[key], theta)
    for rec in srv.records:
        assert rec["updates"] == ["dev-0", "dev-1", "dev-2"]
        assert set(rec["replay_ms"]) == {"dev-0", "dev-1", "dev-2"}
    # the uplink: the log is 12 bytes per step against 4 per weight
    d = run.manifest.num_params
    for msg in sent:
        assert msg.weights.size == 0 and msg.seeds.size == msg.projected.size == 4
        full = dataclasses.replace(msg, weights=trained[(msg.round, msg.sender)],
                                   seeds=np.zeros(0, np.uint64),
                                   projected=np.zeros(0, np.float32), weights_hash=None)
        # weights: 4 bytes each; the log: 8 + 4 per entry, the hash 34 header characters
        # (for "null"), and a few shape digits either way
        saved = len(encode(full)) - len(encode(msg))
        assert abs(saved - (4 * d - 12 * msg.seeds.size - 30)) <= 4


class Tampers(LoopbackTransport):
    """dev-0 sends every update with a hash its log does not replay to, as a device whose
    numpy rounds differently would (a one-ulp nudge of a projection is not enough: Adam's
    first step, m/sqrt(v), can round it away); dev-1 sends, in round 1 only, another
    device's direction seeds."""

    def publish(self, topic: str, msg: Message, **kw: Any) -> int:
        if isinstance(msg, Update) and self.client_id.endswith("dev-0"):
            assert msg.weights_hash is not None
            msg = dataclasses.replace(msg, weights_hash=msg.weights_hash[::-1])
        elif isinstance(msg, Update) and self.client_id.endswith("dev-1") and msg.round == 1:
            msg = dataclasses.replace(msg, seeds=msg.seeds[::-1].copy())
        return super().publish(topic, msg, **kw)


class TampersAndWithholds(Tampers):
    """As Tampers, and dev-0 never answers the server's request for its weights."""

    def publish(self, topic: str, msg: Message, **kw: Any) -> int:
        if isinstance(msg, WeightsReply):
            return 0
        return super().publish(topic, msg, **kw)


def test_a_log_that_does_not_replay_falls_back_to_the_devices_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dev-0's log misses its hash every round: the server asks for its weights, and the
    weights it trained (not a replay of the bad log) are what gets averaged; dev-1's
    malformed log (round 1) is refused outright, with no fallback."""
    trained: dict[tuple[int, str], np.ndarray] = {}
    averaged: dict[tuple[int, str], np.ndarray] = {}
    train, aggregate = Device._train, server.loop.aggregate

    def device_train(self: Device, msg: Any, cfg: Any, send: Any) -> RoundResult:
        result = train(self, msg, cfg, send)
        trained[(msg.round, self.opts.device_id)] = result.theta.copy()
        return result

    def server_aggregate(updates: list[Any], *args: Any) -> np.ndarray:
        r = len({k[0] for k in averaged}) + 1
        averaged.update({(r, u.device_id): u.weights.copy() for u in updates})
        return aggregate(updates, *args)

    monkeypatch.setattr(Device, "_train", device_train)
    monkeypatch.setattr(server.loop, "aggregate", server_aggregate)
    fleet = _replay_fleet(tmp_path, rounds=2)
    run, srv = fleet.server()
    fleet.start_devices(run, 3, Tampers)
    summary = fleet.run(srv)
    assert summary["completed_rounds"] == 2
    first, second = srv.records
    assert first["updates"] == ["dev-0", "dev-2"] and first["dropped"] == ["dev-1"]
    assert second["updates"] == ["dev-0", "dev-1", "dev-2"] and second["dropped"] == []
    for r in (1, 2):  # the weights sent as they are: bit for bit
        np.testing.assert_array_equal(averaged[(r, "dev-0")], trained[(r, "dev-0")])
    d = run.manifest.num_params
    for rec in srv.records:
        assert rec["replay_mismatch"] == rec["weights_fallback"] == ["dev-0"], rec
        # the reply's exact wire size (the run id, sender and round number are as long)
        reply = WeightsReply(run.run_id, rec["round"], "dev-0",
                             weights=np.zeros(d, np.float32))
        assert rec["bytes_up_by_kind"]["weights_fallback"] == sum(map(len, payloads(reply)))
    assert summary["replay_mismatch"] == summary["weights_fallback"] == 2
    assert summary["rejected_by_device"] == {"dev-1": {"bad update": 1}}
    assert summary["quarantined"] == {}


def test_a_device_that_does_not_send_its_weights_is_dropped_at_the_deadline(
        tmp_path: Path) -> None:
    fleet = _replay_fleet(tmp_path, rounds=1)
    fleet.opts = dataclasses.replace(fleet.opts, round_timeout=5)
    run, srv = fleet.server()
    fleet.start_devices(run, 3, TampersAndWithholds)
    summary = fleet.run(srv)
    (rec,) = srv.records
    assert rec["updates"] == ["dev-2"] and rec["dropped"] == ["dev-0", "dev-1"]
    assert rec["replay_mismatch"] == ["dev-0"] and rec["weights_fallback"] == []
    assert rec["bytes_up_by_kind"]["weights_fallback"] == 0
    assert summary["replay_mismatch"] == 1 and summary["weights_fallback"] == 0


@pytest.mark.broker
def test_the_weights_fallback_over_a_real_mosquitto(tmp_path: Path, mosquitto: str) -> None:
    """The same fallback with the server's and devices' real MQTT transports (QoS 1,
    chunking, the request on dev-0's own downlink) through a stock Mosquitto."""
    from edge_runtime.transport.mqtt import MqttTransport
    from server.loop import Server
    from server.setup import build_run, mqtt_transport

    class TamperingMqtt(MqttTransport):
        def publish(self, topic: str, msg: Message, **kw: Any) -> int:
            if isinstance(msg, Update) and self.client_id.endswith("dev-0"):
                assert msg.weights_hash is not None
                msg = dataclasses.replace(msg, weights_hash=msg.weights_hash[::-1])
            return super().publish(topic, msg, **kw)

    fleet = _replay_fleet(tmp_path, devices=2, rounds=1)
    fleet.opts = dataclasses.replace(fleet.opts, broker=mosquitto)
    run = build_run(fleet.opts)
    srv = Server(run, mqtt_transport(run.opts, run.run_id))
    fleet.start_devices(run, 2, lambda _broker, client_id, subs, **kw:
                        TamperingMqtt(mosquitto, client_id, subs, **kw))
    summary = fleet.run(srv)
    (rec,) = srv.records
    assert rec["updates"] == ["dev-0", "dev-1"] and rec["dropped"] == []
    assert rec["replay_mismatch"] == rec["weights_fallback"] == ["dev-0"]
    reply = WeightsReply(run.run_id, 1, "dev-0",
                         weights=np.zeros(run.manifest.num_params, np.float32))
    assert rec["bytes_up_by_kind"]["weights_fallback"] == sum(map(len, payloads(reply)))
    assert summary["rejected"] == {}
