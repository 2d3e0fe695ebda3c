"""The server loop and real devices in one process over the loopback transport: no broker,
no subprocess. Each test runs a `Server` (built by `server.setup.build_run`) and two or
three `edge_runtime.device.Device`s with real ONNX Runtime sessions on digits shards, each
in its own thread, joined through a `LoopbackBroker`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_runtime.device import Device, DeviceOptions, device_endpoint, message_limit
from edge_runtime.protocol import (
    Message,
    Presence,
    RoundStart,
    Smashed,
    TrainConfig,
    Update,
    new_msg_id,
    topics,
)
from edge_runtime.transport import payloads
from edge_runtime.transport.loopback import LoopbackBroker, LoopbackTransport
from server.loop import Server
from server.options import ServerOptions
from server.round_state import RoundState
from server.setup import Run, build_run, server_endpoint

P = topics.DEFAULT_PREFIX
STEPS, EVERY = 4, 2  # per round: 4 ZO steps, an upload every 2 -> 2 smashed batches


@pytest.fixture(autouse=True)
def _torch_defaults() -> Iterator[None]:
    """--deterministic changes process-wide torch settings: put them back for other tests."""
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


class Killed(Exception):
    """Ends a device thread as a crash would (its transport dropped first)."""


class Fleet:
    """A loopback broker, the server and devices in threads."""

    def __init__(self, root: Path, devices: int = 3, rounds: int = 2, **server: Any) -> None:
        self.root = root
        self.broker = LoopbackBroker()
        self.opts = ServerOptions(
            broker="loopback", out=root / "run", dataset="digits", model="cnn",
            devices=devices, rounds=rounds, join_timeout=60, round_timeout=60, threads=1,
            train=TrainConfig(local_steps=STEPS, upload_every=EVERY, batch_size=16), **server)
        self.devices: list[Device] = []
        self.codes: dict[str, int | str] = {}
        self.threads: list[threading.Thread] = []

    def server(self, opts: ServerOptions | None = None) -> tuple[Run, Server]:
        run = build_run(opts or self.opts)
        t = LoopbackTransport.at(self.broker, server_endpoint(run.opts.prefix, run.run_id))
        return run, Server(run, t)

    def shards(self, run: Run, n: int) -> list[Path]:
        paths = []
        for i in range(n):
            path = self.root / f"dev-{i}.npz"
            if not path.exists():
                np.savez(path, x=run.data.x_train[i::n].astype(np.float32),
                         y=run.data.y_train[i::n].astype(np.int64))
            paths.append(path)
        return paths

    def start_devices(self, run: Run, n: int,
                      transport: Callable[..., LoopbackTransport] = LoopbackTransport) -> None:
        for i, shard in enumerate(self.shards(run, n)):
            dev = f"dev-{i}"
            opts = DeviceOptions(broker="loopback", device_id=dev, data=shard, threads=1,
                                 bundle_cache=self.root / "cache", wait_server_s=60)
            ep = device_endpoint(dev, P)
            t = transport(self.broker, ep.client_id, ep.subscriptions, will=ep.will,
                          max_message_bytes=message_limit(None))
            device = Device(opts, t)
            self.devices.append(device)
            th = threading.Thread(target=self._device, args=(device,), daemon=True)
            th.start()
            self.threads.append(th)

    def _device(self, device: Device) -> None:
        try:
            self.codes[device.opts.device_id] = device.run()
        except Killed:
            self.codes[device.opts.device_id] = "killed"

    def run(self, server: Server) -> dict[str, Any]:
        summary = server.run()
        for th in self.threads:
            th.join(30)
        assert not any(th.is_alive() for th in self.threads)
        self.threads.clear()
        return summary


def test_a_normal_round_trains_every_device_and_ends_them(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    run, server = fleet.server()
    fleet.start_devices(run, 3)
    summary = fleet.run(server)
    assert summary["completed_rounds"] == 2 and not summary["interrupted"]
    assert summary["deterministic"] is False
    for rec in server.records:
        assert rec["updates"] == ["dev-0", "dev-1", "dev-2"] and rec["dropped"] == []
        assert rec["smashed_batches"] == 3 * STEPS // EVERY
    assert summary["rejected"] == {}
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    # the devices got the bundle over the loopback, trained both rounds, obeyed the stop
    assert fleet.codes == {"dev-0": 0, "dev-1": 0, "dev-2": 0}
    assert all(d.rounds_done == 2 and d.ignored == {} for d in fleet.devices)
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2


class DropsMidRound(LoopbackTransport):
    """dev-2's link dies after its first smashed upload of round 1."""

    def publish(self, topic: str, msg: Message, **kw: Any) -> int:
        n = super().publish(topic, msg, **kw)
        if self.client_id.endswith("dev-2") and isinstance(msg, Smashed):
            self.drop()  # the broker publishes its will: offline presence
            raise Killed
        return n


def test_a_device_that_drops_mid_round_leaves_it_and_the_round_closes(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    run, server = fleet.server()
    fleet.start_devices(run, 3, DropsMidRound)
    summary = fleet.run(server)
    assert summary["completed_rounds"] == 2
    first, second = server.records
    assert first["participants"] == ["dev-0", "dev-1", "dev-2"]
    assert first["updates"] == ["dev-0", "dev-1"] and first["dropped"] == ["dev-2"]
    assert second["participants"] == ["dev-0", "dev-1"]  # gone devices are not picked again
    assert fleet.codes == {"dev-0": 0, "dev-1": 0, "dev-2": "killed"}
    will = fleet.broker.retained(topics.device_status("dev-2", P))
    assert will is not None  # retained by the broker, as a real one does


class Replays(LoopbackTransport):
    """dev-0 sends each update twice with one message id (a QoS 1 redelivery) and first a
    copy for the round before (stale); each smashed batch is redelivered too."""

    def publish(self, topic: str, msg: Message, **kw: Any) -> int:
        if self.client_id.endswith("dev-0") and isinstance(msg, Update):
            super().publish(topic, replace(msg, round=msg.round - 1, msg_id=new_msg_id()))
        n = super().publish(topic, msg, **kw)
        if self.client_id.endswith("dev-0") and isinstance(msg, Update | Smashed):
            for part in payloads(msg):
                self.publish_raw(topic, part)
        return n


def test_stale_and_duplicate_messages_are_counted_and_never_applied(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, rounds=3)
    run, server = fleet.server()
    fleet.start_devices(run, 3, Replays)
    summary = fleet.run(server)
    assert summary["completed_rounds"] == 3
    for rec in server.records:  # one update per device, every batch trained on once
        assert rec["updates"] == ["dev-0", "dev-1", "dev-2"]
        assert rec["smashed_batches"] == 3 * STEPS // EVERY
    rejected = summary["rejected"]
    # what came after a round's close is counted in the next one; rounds 1-2 at least
    assert rejected["stale round"] >= 2
    assert rejected["duplicate message"] >= 2 * (1 + STEPS // EVERY)
    assert set(rejected) == {"stale round", "duplicate message"}
    assert set(summary["rejected_by_device"]) == {"dev-0"}
    assert summary["quarantined"] == {}  # late and redelivered copies are not hostile


def test_resume_continues_after_the_last_checkpointed_round(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, devices=2, rounds=2)
    run, server = fleet.server()
    fleet.start_devices(run, 2)
    first = fleet.run(server)
    assert first["completed_rounds"] == 2
    # a new server process on the same --out, asked for one more round
    run2, server2 = fleet.server(replace(fleet.opts, rounds=3, resume=True))
    assert run2.run_id == first["run_id"] and run2.checkpoint is not None
    assert server2.first_round == 3
    np.testing.assert_array_equal(run2.theta, server.theta)
    # the resumed server announces itself as online; new device processes join it
    assert fleet.broker.retained(topics.server_status(P)) is not None
    fleet.devices.clear()
    fleet.start_devices(run2, 2)
    summary = fleet.run(server2)
    assert summary["completed_rounds"] == 3 and summary["run_id"] == first["run_id"]
    assert summary["test_accuracy_per_round"][:2] == first["test_accuracy_per_round"]
    assert [r["round"] for r in server2.records] == [1, 2, 3]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 3


def _deterministic_run(root: Path) -> tuple[dict[str, Any], Server]:
    fleet = Fleet(root, rounds=2, deterministic=True)
    run, server = fleet.server()
    fleet.start_devices(run, 3)
    return fleet.run(server), server


def test_deterministic_runs_are_bit_for_bit_identical(tmp_path: Path) -> None:
    a, server_a = _deterministic_run(tmp_path / "a")
    b, server_b = _deterministic_run(tmp_path / "b")
    assert a["deterministic"] is True and a["config"]["deterministic"] is True
    assert a["test_accuracy_per_round"] == b["test_accuracy_per_round"]
    assert [r["test_loss"] for r in server_a.records] == [r["test_loss"] for r in
                                                         server_b.records]
    assert [r["server_train_loss"] for r in server_a.records] == \
        [r["server_train_loss"] for r in server_b.records]
    np.testing.assert_array_equal(server_a.theta, server_b.theta)
    for (name, pa), pb in zip(server_a.split.server.state_dict().items(),
                              server_b.split.server.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_deterministic_refuses_what_it_cannot_order(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, deterministic=True)
    with pytest.raises(ValueError, match="--deterministic does not apply to --algorithm sflv2"):
        build_run(replace(fleet.opts, train=TrainConfig(algorithm="sflv2")))
    with pytest.raises(ValueError, match="--deterministic cannot be used with --min-devices"):
        build_run(replace(fleet.opts, min_devices=2))


def test_the_server_transport_will_is_its_offline_presence() -> None:
    ep = server_endpoint(P, "run-1")
    assert ep.will is not None
    topic, msg = ep.will
    assert topic == topics.server_status(P)
    assert isinstance(msg, Presence) and (msg.run_id, msg.state) == ("run-1", "offline")


def test_eval_every_and_limit_evaluate_a_subset_then_the_full_set_and_log_scalars(
        tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fleet = Fleet(tmp_path, devices=2, rounds=3, eval_every=2, eval_limit=50,
                  tensorboard=tmp_path / "tb")
    run, server = fleet.server()
    fleet.start_devices(run, 2)
    summary = fleet.run(server)
    first, second, third = server.records
    assert first["test_accuracy"] is None and first["test_examples"] is None
    assert second["test_examples"] == 50  # --eval-limit while training
    assert third["test_examples"] == len(run.data.y_test)  # the last round: the full set
    assert summary["final_test_accuracy"] == third["test_accuracy"]
    assert summary["final_test_examples"] == len(run.data.y_test)
    for rec in server.records:
        split = [rec[k] for k in ("seconds_waiting", "seconds_training", "seconds_evaluating",
                                  "seconds_aggregating")]
        # four disjoint stretches of the round's wall time, each rounded to 0.1 ms
        assert all(s >= 0 for s in split) and sum(split) <= rec["round_seconds"] + 1e-3
        assert rec["seconds_training"] > 0  # cnn/heron: the server trained on smashed data
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"test_accuracy": null' in lines[0]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("test/accuracy")] == [2, 3]
    assert [e.step for e in acc.Scalars("train/server_loss")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("device/dev-1/peak_rss_mb")] == [1, 2, 3]
    # the writer stores float32: equal to the record within float32's relative precision
    assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(third["test_accuracy"],
                                                                   rel=2 ** -23)


def test_bytes_by_kind_add_up_to_what_the_transports_counted(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, devices=2, rounds=2)
    run, server = fleet.server()
    fleet.start_devices(run, 2)
    summary = fleet.run(server)
    up, down = summary["bytes_up_by_kind"], summary["bytes_down_by_kind"]
    assert set(up) == set(down) == {"smashed", "grad", "weights", "weights_fallback", "bundle",
                                    "control"}
    assert sum(up.values()) == summary["bytes_up"] == server.transport.bytes_in
    # what the devices' transports sent and received, by the kind of message
    sent = [d.transport.bytes_out_by_kind for d in fleet.devices]
    got = [d.transport.bytes_in_by_kind for d in fleet.devices]
    # (the devices' offline presence may reach the server after it has left the broker)
    assert up["smashed"] == sum(s["smashed"] for s in sent) > 0
    assert up["weights"] == sum(s["update"] for s in sent) > 0
    assert up["bundle"] == up["grad"] == 0  # heron: no gradient comes back
    assert up["weights_fallback"] == 0  # weights sync: nothing to fall back from
    assert sum(down.values()) == summary["bytes_down"]
    assert down["bundle"] == sum(g["bundle"] for g in got) > 0
    assert down["weights"] == sum(g["round"] for g in got) > 0
    assert down["control"] == sum(g["stop"] for g in got) > 0
    # each round's line has that round's split; the run's is their sum and the bundle's
    recs = server.records
    for key, total in (("bytes_up_by_kind", up), ("bytes_down_by_kind", down)):
        assert all(sum(r[key].values()) == r[f"round_{key[:-8]}"] for r in recs)
        assert sum(r[key]["smashed"] for r in recs) == total["smashed"]
    assert summary["device_params"] == run.manifest.num_params > 0


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_a_run_with_a_smashed_codec_sends_fewer_smashed_bytes(tmp_path: Path,
                                                              codec: str) -> None:
    fleet = Fleet(tmp_path, devices=2, rounds=1)
    fleet.opts = replace(fleet.opts, train=replace(fleet.opts.train, smashed_codec=codec))
    run, server = fleet.server()
    fleet.start_devices(run, 2)
    summary = fleet.run(server)
    assert summary["rejected"] == {} and summary["completed_rounds"] == 1
    assert server.records[0]["smashed_batches"] == 2 * STEPS // EVERY
    # cnn at conv1 on digits: 16x8x8 floats per sample, 16 per batch; the header, labels
    # and int8's 2x16 float parameters are small next to the 16 KiB-per-batch saved
    per_batch = summary["bytes_up_by_kind"]["smashed"] / (2 * STEPS // EVERY)
    fp32 = 16 * 16 * 8 * 8 * 4
    assert per_batch < fp32 * {"fp16": 0.52, "int8": 0.27}[codec]


def test_a_smashed_upload_in_another_codec_is_rejected(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    fleet = Fleet(tmp_path, devices=1, rounds=1)
    fleet.opts = replace(fleet.opts, train=replace(fleet.opts.train, smashed_codec="int8"))
    run, server = fleet.server()
    start = RoundStart(run.run_id, 1, "server", weights=run.theta, participants=("dev-0",),
                       config=fleet.opts.train.to_json())
    state = RoundState(("dev-0",), start, None)
    msg = Smashed(run.run_id, 1, "dev-0", step=0,
                  activations=np.zeros((2, 16, 8, 8), np.float32),
                  labels=np.zeros(2, np.int64))
    with caplog.at_level(logging.WARNING, logger="heron.server"):
        server._smashed("dev-0", msg, state)
    assert server.members.rejected == {"bad smashed data": 1}
    assert "codec fp32, but this run's devices code with int8" in caplog.text


def test_frozen_devices_send_no_weights_and_a_weights_update_from_one_is_refused(
        tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, devices=2, rounds=2)
    fleet.opts = replace(fleet.opts, train=replace(fleet.opts.train, algorithm="frozen"))
    run, server = fleet.server()
    start_theta = run.theta.copy()
    fleet.start_devices(run, 2)
    summary = fleet.run(server)
    assert summary["rejected"] == {} and summary["completed_rounds"] == 2
    assert all(r["updates"] == ["dev-0", "dev-1"] for r in server.records)
    # the update is the header, sample count and telemetry only: far below the 330 weights'
    # 1,320 bytes (the byte model's `sends_weights=False`)
    per_update = summary["bytes_up_by_kind"]["weights"] / (2 * 2)
    assert per_update < run.manifest.num_params * 4
    assert np.array_equal(server.theta, start_theta)  # averaging stood for the start weights
    # a frozen device that sends weights anyway is refused, not averaged
    start = RoundStart(run.run_id, 3, "server", weights=run.theta, participants=("dev-0",),
                       config=fleet.opts.train.to_json())
    state = RoundState(("dev-0",), start, None)
    server._update("dev-0", Update(run.run_id, 3, "dev-0", weights=run.theta + 1.0), state)
    assert state.updates == {} and server.members.rejected == {"bad update": 1}
