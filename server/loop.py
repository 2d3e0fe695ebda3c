"""The server's round loop: broadcast a round, handle what comes back, close it, aggregate,
evaluate, record.

The round loop is the one `for` in `Server.run`; who is in and what is refused is
`server.members`, planning and aggregation are pure functions in `server.aggregate`, training
is `server.trainer` through the run's strategy, and what is written is `server.records`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edge_runtime.protocol import (
    BundleFiles,
    Gradient,
    Presence,
    RoundStart,
    Smashed,
    Stop,
    Update,
    WeightsReply,
    WeightsRequest,
    server_info,
    topics,
)
from edge_runtime.protocol.topics import payload_kind
from edge_runtime.transport import RECONNECTED, Incoming, Transport
from exporter.export import aux_from_server
from server.aggregate import (
    DeviceUpdate,
    aggregate,
    clip_update,
    plan_round,
    trimmed_count,
)
from server.evaluation import EvalPlan, evaluate_round
from server.fleet_view import fleet_observer
from server.members import Members
from server.policy import check_device_update, check_smashed
from server.records import (
    append_jsonl,
    round_line,
    round_record,
    run_summary,
    save_checkpoint,
    write_json,
    write_jsonl,
)
from server.replay import replay_update
from server.round_state import RoundState
from server.tensorboard import RoundLog
from server.traffic import Traffic

if TYPE_CHECKING:
    from server.setup import Run

log = logging.getLogger("heron.server")


class Interrupted(Exception):
    """`Server.stop` was set (SIGTERM/SIGINT): raised between messages, so the round in
    progress is dropped and every completed round stays checkpointed."""


class Server:
    """One run's server: `run()` admits devices, drives the rounds and records them."""

    def __init__(self, run: Run, transport: Transport) -> None:
        """`run`: what `server.setup.build_run` made; `transport`: where the messages go
        (`server.setup.mqtt_transport`, or a loopback one in tests) — its will should be
        this run's offline presence (`server.setup.server_endpoint`)."""
        opts = run.opts
        self.opts = opts
        self.run_id = run.run_id
        self.stop = threading.Event()  # set from a signal handler: stop at the next message
        self.data = run.data
        self.split = run.split
        self.manifest = run.manifest
        self.bundle_files = run.bundle_files
        self.bundle_sha = run.bundle_sha
        self.trainer = run.trainer
        self.strategy = run.strategy
        self.theta = run.theta
        self.aux_copied = run.aux_copied
        self._state: RoundState | None = None  # the round in progress
        self.members = Members(opts.limits, opts.prefix, run.run_id, run.strategy.algorithm,
                               run.bundle_sha, send_bundle=self._send_bundle,
                               leave_round=self._leave_round)
        self._trim_warned = False
        self.view = fleet_observer(opts)  # what the live fleet page shows (--http)
        self.traffic = Traffic()
        self.peak_rss: dict[str, float] = {}
        self.records: list[dict[str, Any]] = []  # one per completed round
        self.first_round = 1
        self.eval_plan = EvalPlan(opts.eval_every, opts.eval_limit, opts.seed)
        self.elapsed_before = 0.0  # wall time of earlier sessions of a resumed run
        if run.checkpoint is not None:
            self._restore(run.checkpoint)
        self.transport = transport

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Continue after the last completed round: the records and counters of the
        checkpoint `build_run` loaded the model state from."""
        self.records = list(ckpt["records"])
        self.first_round = int(ckpt["round"]) + 1
        counters = ckpt["counters"]
        self.traffic.restore(counters)
        self.peak_rss = dict(counters["peak_rss"])
        self.members.restore(counters)
        self.elapsed_before = float(counters["elapsed"])
        # metrics.jsonl may hold a line for a round the checkpoint never saw: rebuild it from
        # the checkpoint, which is the record of what was completed.
        write_jsonl(self.opts.out / "metrics.jsonl", self.records)

    def _leave_round(self, device_id: str) -> None:
        """A device that went offline, was quarantined, reported an error or needs the
        bundle: the round in progress no longer waits for it."""
        state = self._state
        if state is not None and device_id in state.participants:
            state.gone.add(device_id)

    # -- sending ---------------------------------------------------------------------------
    def _announce(self) -> None:
        o = self.opts
        self.transport.publish(
            topics.server_status(o.prefix),
            Presence(self.run_id, -1, "server", state="online",
                     info=server_info(o.model, self.manifest.cut, o.dataset, o.train.to_json())),
            retain=True)

    def _send_bundle(self, device_id: str) -> None:
        names = tuple(self.bundle_files)
        blobs = tuple(np.frombuffer(self.bundle_files[n], dtype=np.uint8) for n in names)
        n = self.transport.publish(topics.down_device(device_id, "bundle", self.opts.prefix),
                                   BundleFiles(self.run_id, 0, "server", names=names,
                                               blobs=blobs))
        self.traffic.add_down("bundle", n)
        log.info("sent bundle (%.1f kB) to %s", n / 1e3, device_id)

    def _broadcast(self, state: RoundState) -> None:
        n = self.transport.publish(topics.down_all("round", self.opts.prefix), state.start)
        # the broker delivers one copy to each
        self.traffic.add_down("round", n * len(state.participants))

    # -- receiving -------------------------------------------------------------------------
    def _poll(self, timeout: float, state: RoundState | None, round_idx: int) -> None:
        """Handle one incoming message (or none within `timeout`); bad input never raises."""
        if self.stop.is_set():
            raise Interrupted(f"stopped after round {len(self.records)}/{self.opts.rounds}")
        inc: Incoming | None = self.transport.get(timeout)
        if inc is None:
            return
        if inc.topic == RECONNECTED:
            log.warning("reconnected to the broker; announcing again")
            self._announce()
            if state is not None and not state.finished():
                self._broadcast(state)  # the broker may have lost the round's start
            return
        self._count_up(inc)
        try:
            self._dispatch(inc, state, round_idx)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the run
            log.exception("error handling a message on %s", inc.topic)
            self.members.reject(inc.topic, f"unhandled: {type(exc).__name__}: {exc}",
                                device=False)
        self.view.message(inc, self.members, state)

    def _count_up(self, inc: Incoming) -> None:
        if inc.topic != RECONNECTED:
            self.traffic.add_up(inc.message.kind if inc.message else payload_kind(inc.topic),
                                inc.nbytes)

    def _dispatch(self, inc: Incoming, state: RoundState | None, round_idx: int) -> None:
        admitted = self.members.admit(inc, state, round_idx)
        if admitted is None:
            return
        device_id, msg = admitted
        assert state is not None  # admitted: a participant's message for this round
        if isinstance(msg, Smashed):
            self._smashed(device_id, msg, state)
        elif isinstance(msg, WeightsReply):
            self._weights_reply(device_id, msg, state)
        else:
            self._update(device_id, msg, state)

    def _smashed(self, device_id: str, msg: Smashed, state: RoundState) -> None:
        """Hand a checked upload to the strategy: it trains the server part, and may answer
        with the cut-layer gradient (SplitFed)."""
        if self.strategy.refuses_smashed:
            self.members.reject(device_id, self.strategy.refuses_smashed)
            return
        count = state.smashed[device_id] = state.smashed.get(device_id, 0) + 1
        batch = msg.activations.shape[0] if msg.activations.ndim else 0
        why = check_smashed(count, msg.step, batch, self.opts.train, state.start.round)
        if why is None and msg.codec != self.opts.train.smashed_codec:
            why = (f"bad smashed data: codec {msg.codec}, but this run's devices code with "
                   f"{self.opts.train.smashed_codec}")
        act = msg.decoded() if why is None else msg.activations  # decode checked the codec
        if why is None and (bad := self.trainer.check_batch(act, msg.labels)):
            why = f"bad smashed data: {bad}"
        if why:
            self.members.reject(device_id, why)
            return
        t0 = time.perf_counter()
        out = self.strategy.on_smashed(device_id, msg.step, act, msg.labels)
        state.seconds_training += time.perf_counter() - t0
        if out.rejected:
            self.members.reject(device_id, out.rejected)
            return
        if out.loss is not None:
            state.server_losses.append(out.loss)
        if out.gradient is None:
            return
        key = (device_id, msg.step)
        reply = state.grads.get(key)
        if reply is None:  # a redelivered step gets the same message again
            reply = Gradient(self.run_id, state.start.round, "server", step=msg.step,
                             grad=out.gradient, loss=out.reply_loss)
            state.grads[key] = reply
        self.traffic.add_down("grad", self.transport.publish(
            topics.down_device(device_id, "grad", self.opts.prefix), reply))

    def _update(self, device_id: str, msg: Update, state: RoundState) -> None:
        o = self.opts
        if device_id in state.updates or device_id in state.replay_mismatch or (
                o.train.device_sync == "replay" and device_id in state.gone):
            self.members.reject(device_id, "duplicate update: already have this round's update")
            return
        got = replay_update(msg, state.start.weights, o.train, self.manifest,
                            state.start.round, device_id)
        if got.seconds:
            state.replay_ms[device_id] = round(got.seconds * 1000.0, 3)
        if got.mismatch:  # an honest device with another numpy: ask for the weights
            state.replay_mismatch[device_id] = msg
            log.warning("round %d: %s; asking %s for its weights", state.start.round,
                        got.rejected, device_id)
            self.traffic.add_down("weights_request", self.transport.publish(
                topics.down_device(device_id, "weights_request", o.prefix),
                WeightsRequest(self.run_id, state.start.round, "server",
                               reason="replay mismatch")))
            return
        self._accept_update(device_id, msg, got.weights, got.rejected, state)

    def _weights_reply(self, device_id: str, msg: WeightsReply, state: RoundState) -> None:
        """A device's weights after its log did not replay: checked like any weights
        update, with the sample count and telemetry of the update they stand in for."""
        update = state.replay_mismatch.pop(device_id, None)
        if update is None:
            self.members.reject(device_id, "unasked weights: no weights request is open for "
                                           "this device this round")
            return
        state.weights_fallback.append(device_id)
        self._accept_update(device_id, update, msg.weights, None, state)

    def _accept_update(self, device_id: str, msg: Update, weights: np.ndarray | None,
                       rejected: str | None, state: RoundState) -> None:
        o = self.opts
        why = rejected or check_device_update(
            weights, msg.num_samples, self.members.declared_samples(device_id), self.theta,
            o.max_weight_abs, o.max_update_norm)
        if why:
            self.members.reject(device_id, why)
            state.gone.add(device_id)
            return
        assert weights is not None
        if o.clip_update_norm is not None:
            weights, norm = clip_update(weights, self.theta, o.clip_update_norm)
            if norm > o.clip_update_norm:
                state.clipped.append(device_id)
                log.info("round %d: update of %s clipped from %.3g to --clip-update-norm %g",
                         state.start.round, device_id, norm, o.clip_update_norm)
        state.updates[device_id] = DeviceUpdate(device_id, weights, msg.num_samples)
        if msg.telemetry is not None:  # decoded and bounded: every field is there
            state.telemetry[device_id] = msg.telemetry

    # -- the run ---------------------------------------------------------------------------
    def _wait_for_devices(self, need: int) -> None:
        deadline = time.monotonic() + self.opts.join_timeout
        shown = -1
        ready = self.members.ready
        while len(ready) < need:
            if len(ready) != shown:
                shown = len(ready)
                print(f"waiting for devices: {shown}/{need} ready "
                      f"(broker {self.transport.address}, prefix {self.opts.prefix!r})",
                      flush=True)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(ready)}/{need} devices joined within "
                    f"{self.opts.join_timeout:.0f} s; help: start devices with `heron device "
                    f"--broker {self.transport.address} --id ID --data SHARD` or lower --devices")
            self._poll(0.5, None, 0)

    def _run_round(self, r: int) -> dict[str, Any]:
        o = self.opts
        t0 = time.monotonic()
        before = self.traffic.snapshot()
        participants = plan_round(list(self.members.ready), o.per_round, r, o.seed)
        start = RoundStart(self.run_id, r, "server", weights=self.theta,
                           participants=participants, config=o.train.to_json(),
                           bundle_sha256=self.bundle_sha)
        state = RoundState(participants, start, o.min_devices)
        self.strategy.begin_round(r)
        self._state = state
        self._broadcast(state)
        self.view.round_started(r, participants, o.round_timeout)
        deadline = t0 + o.round_timeout
        try:
            while not state.finished() and time.monotonic() < deadline:
                self._poll(0.2, state, r)
        finally:
            self._state = None
        t_closed = time.monotonic()
        state.server_losses.extend(self.strategy.close_smashed())
        t_trained = time.monotonic()
        if not state.finished():
            log.warning("round %d timed out after %.0f s; closing with %d/%d updates", r,
                        o.round_timeout, len(state.updates), len(participants))
        if state.updates:
            n_up = len(state.updates)
            if o.aggregate == "trimmed-mean" and trimmed_count(n_up, o.trim) == 0 and \
                    n_up >= 3 and not self._trim_warned:
                self._trim_warned = True
                log.warning("--aggregate trimmed-mean with --trim %g drops nothing from %d "
                            "updates (it is the mean); help: --trim >= %.3g trims one at each "
                            "end", o.trim, n_up, 1 / n_up)
            # in device-id order: the float sums do not depend on arrival order
            self.theta = aggregate([state.updates[d] for d in sorted(state.updates)],
                                   o.weighting, o.aggregate, o.trim)
        else:
            log.warning("round %d: no device update arrived; keeping the global weights", r)
        self.strategy.end_round(state.updates)
        if self.aux_copied:  # next round's aux starts from the server's trained layers
            self.theta, _ = aux_from_server(self.split.server, self.manifest, self.theta)
        self.strategy.load_global(self.theta)
        t_aggregated = time.monotonic()
        ev = evaluate_round(self.eval_plan, r, o.rounds, self.split.client, self.split.server,
                            self.data.x_test, self.data.y_test, o.threads)
        times = {"seconds_waiting": t_closed - t0 - state.seconds_training,
                 "seconds_training": state.seconds_training + t_trained - t_closed,
                 "seconds_evaluating": time.monotonic() - t_aggregated,
                 "seconds_aggregating": t_aggregated - t_trained}
        for dev, tel in state.telemetry.items():
            self.peak_rss[dev] = max(self.peak_rss.get(dev, 0.0), tel.peak_rss_mb)
        m = self.members
        m.count_incomplete(self.transport.take_dropped_by_topic(),
                           "dropped incomplete (expired, or over its sender's budget)")
        return round_record(state, ev, m, traffic=self.traffic, since=before,
                            seconds=round(time.monotonic() - t0, 3), times=times)

    def run(self) -> dict[str, Any]:
        o = self.opts
        t_start = time.monotonic() - self.elapsed_before
        self.transport.start()
        self._announce()
        self.view.started(self.run_id, o, self.records)
        metrics_path = o.out / "metrics.jsonl"
        if not o.resume:
            metrics_path.unlink(missing_ok=True)
        interrupted = False
        board = RoundLog(o.tensorboard) if o.tensorboard is not None else None
        try:
            if self.first_round > o.rounds:
                print(f"run {self.run_id} already completed its {o.rounds} rounds", flush=True)
                return self._finish(t_start)
            o_min = o.min_devices
            self._wait_for_devices(o.devices if o_min is None else min(o.devices, o_min))
            ready = self.members.ready
            print(f"run {self.run_id}: {o.train.algorithm} {o.model}/{self.manifest.cut} on "
                  f"{o.dataset}, {len(ready)} devices, rounds {self.first_round}..{o.rounds}"
                  f", {self.manifest.num_params} device params", flush=True)
            for r in range(self.first_round, o.rounds + 1):
                if len(ready) < (o.min_devices or 1):
                    # everyone left (a broker outage drops them all): a round without
                    # participants would close at once, and so would every one after it
                    log.warning("round %d: %d devices ready; waiting up to --join-timeout %.0f "
                                "s for devices to (re)join", r, len(ready), o.join_timeout)
                    self._wait_for_devices(o.min_devices or 1)
                rec = self._run_round(r)
                rec["elapsed_seconds"] = round(time.monotonic() - t_start, 3)
                self.records.append(rec)
                # checkpoint first: a round is complete once its checkpoint exists
                self._checkpoint(r, time.monotonic() - t_start)
                append_jsonl(metrics_path, rec)
                self.view.round_done(rec, self.members)
                if board is not None:
                    board.add(rec)
                print(round_line(rec, o.rounds), flush=True)
            n = self.transport.publish(topics.down_all("stop", o.prefix),
                                       Stop(self.run_id, o.rounds, "server", reason="finished"),
                                       wait=10.0)
            self.traffic.add_down("stop", n * len(self.members.ready))
        except Interrupted as exc:  # the summary below matches the checkpoint
            interrupted = True
            print(f"run {self.run_id}: {exc}; continue with --resume", flush=True)
        finally:
            self.view.finished()
            self.transport.publish(topics.server_status(o.prefix),
                                   Presence(self.run_id, -1, "server", state="offline"),
                                   retain=True, wait=5.0)
            self.transport.stop()
            if board is not None:
                board.close()
        return self._finish(t_start, interrupted)

    def _finish(self, t_start: float, interrupted: bool = False) -> dict[str, Any]:
        m = self.members
        while (inc := self.transport.get(0)) is not None:  # counted, too late to handle
            self._count_up(inc)
        m.count_incomplete(self.transport.take_dropped_by_topic(),
                           "dropped incomplete (expired, or over its sender's budget)")
        m.count_incomplete(self.transport.pending_by_topic(), "still incomplete at the end")
        summary = run_summary(self.opts, self.run_id, self.manifest, m, self.records,
                              traffic=self.traffic,
                              peak_rss=self.peak_rss, interrupted=interrupted,
                              wall_seconds=round(time.monotonic() - t_start, 3))
        write_json(self.opts.out / "summary.json", summary)
        return summary

    def _checkpoint(self, r: int, elapsed: float) -> None:
        def plain(obj: Any) -> Any:  # only JSON types, so torch's weights_only load accepts it
            return json.loads(json.dumps(obj))

        save_checkpoint(self.opts.out / "checkpoint.pt", {
            "round": r,
            "run_id": self.run_id,
            "device_weights": torch.from_numpy(self.theta.copy()),
            "server_state": self.split.server.state_dict(),
            "server_optimizer": self.trainer.optimizer.state_dict(),
            "manifest": plain(self.manifest.to_json()),
            "train_config": plain(self.opts.train.to_json()),
            "records": plain(self.records),
            "counters": plain({**self.traffic.counters(),
                               "peak_rss": self.peak_rss, "elapsed": elapsed,
                               **self.members.counters()}),
        })
