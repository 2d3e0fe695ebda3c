"""The server's MQTT loop: admit devices, run the rounds, record everything.

The round loop is the one `for` in `Server.run`; planning and aggregation are pure
functions in `server.aggregate`, training in `server.trainer`.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edge_runtime.protocol import (
    BundleFiles,
    DeviceError,
    Gradient,
    Join,
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
from edge_runtime.transport import RECONNECTED, Credentials, Incoming, Transport
from exporter.export import aux_from_server
from server.aggregate import (
    DeviceUpdate,
    aggregate,
    check_update,
    clip_update,
    plan_round,
    trimmed_count,
)
from server.policy import (
    ERROR_CHARS,
    NON_MEMBER_ERROR_CHARS,
    Guard,
    Limits,
    check_declared_samples,
    check_num_samples,
    check_smashed_step,
    clip_text,
    redelivery_slack,
    smashed_budget,
)
from server.records import (
    append_jsonl,
    atomic_write_bytes,
    save_checkpoint,
    write_json,
)
from server.trainer import evaluate

if TYPE_CHECKING:
    from server.setup import Run

log = logging.getLogger("heron.server")

LOGGED_PER_KIND = 3  # rejections of one kind logged per sender; the rest are only counted


class Interrupted(Exception):
    """`Server.stop` was set (SIGTERM/SIGINT): raised between messages, so the round in
    progress is dropped and every completed round stays checkpointed."""


@dataclass(frozen=True)
class ServerOptions:
    broker: str
    out: Path
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "cnn"
    cut: str | None = None
    devices: int = 3  # how many ready devices to wait for before round 1
    rounds: int = 20
    per_round: int | None = None  # devices picked per round (default: all ready)
    train: TrainConfig = field(default_factory=TrainConfig)
    server_optimizer: str = "adam"
    server_lr: float = 1e-3
    weighting: str = "samples"
    seed: int = 0
    prefix: str = topics.DEFAULT_PREFIX
    threads: int | None = None
    join_timeout: float = 300.0
    round_timeout: float = 600.0
    min_devices: int | None = None  # close a round once this many updates are in
    resume: bool = False  # continue from OUT/checkpoint.pt
    max_update_norm: float | None = None  # reject updates farther from the global weights
    clip_update_norm: float | None = None  # pull updates back to this distance (L2)
    aggregate: str = "mean"  # mean | median | trimmed-mean (server.aggregate)
    trim: float = 0.2  # trimmed-mean: fraction dropped at each end of every coordinate
    limits: Limits = field(default_factory=Limits)  # per-device limits (server.policy)
    max_weight_abs: float = 1e4  # larger weights are treated as a broken or hostile update
    aux_from_server: bool = False  # each round the aux head starts as the server's first layers
    credentials: Credentials | None = None
    # bit-for-bit repeatable on one machine: a round's smashed batches trained at its end in
    # (step, device) order, torch's deterministic kernels (server.setup.make_deterministic)
    deterministic: bool = False
    dataset_options: dict[str, Any] = field(default_factory=dict)  # load_dataset keywords
    model_options: dict[str, Any] = field(default_factory=dict)  # build_split keywords


@dataclass
class _RoundState:
    participants: tuple[str, ...]
    start: RoundStart
    min_devices: int | None = None
    updates: dict[str, DeviceUpdate] = field(default_factory=dict)
    telemetry: dict[str, Telemetry] = field(default_factory=dict)
    server_losses: list[float] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)
    grads: dict[tuple[str, int], Gradient] = field(default_factory=dict)  # SplitFed replies
    smashed: dict[str, int] = field(default_factory=dict)  # device -> uploads this round
    clipped: list[str] = field(default_factory=list)  # devices whose update was clipped

    def finished(self) -> bool:
        """Every live participant reported, or the configured minimum did."""
        if self.min_devices is not None and len(self.updates) >= self.min_devices:
            return True
        return all(p in self.updates or p in self.gone for p in self.participants)


class Server:
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
        self.bundle = run.bundle
        self.bundle_sha = run.bundle_sha
        self.trainer = run.trainer
        self.algorithm = opts.train.algorithm
        self.strategy = run.strategy
        self.theta = run.theta
        self.aux_copied = run.aux_copied
        self.online: set[str] = set()
        self.ready: dict[str, dict[str, Any]] = {}  # device id -> profile from its join
        self.profiles: dict[str, dict[str, Any]] = {}  # every device that was ever ready
        self.joined: set[str] = set()  # devices whose join was accepted (ready, or sent the
        # bundle): their error reports are heard, e.g. why they refused the bundle
        self.rejected: dict[str, int] = {}
        self.guard = Guard(opts.limits)
        self.device_errors: dict[str, int] = {}  # error messages from members, per device
        self._logged: dict[tuple[str, str], int] = {}  # (sender, kind) -> rejections logged
        self._state: _RoundState | None = None  # the round in progress, for quarantine
        self._trim_warned = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.peak_rss: dict[str, float] = {}
        self.records: list[dict[str, Any]] = []  # one per completed round
        self.first_round = 1
        self.elapsed_before = 0.0  # wall time of earlier sessions of a resumed run
        if run.checkpoint is not None:
            self._restore(run.checkpoint)
        self.transport = transport

    # -- resume ----------------------------------------------------------------------------
    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Continue after the last completed round: the records and counters of the
        checkpoint `build_run` loaded the model state from."""
        self.records = list(ckpt["records"])
        self.first_round = int(ckpt["round"]) + 1
        counters = ckpt["counters"]
        self.bytes_up, self.bytes_down = int(counters["bytes_up"]), int(counters["bytes_down"])
        self.rejected = dict(counters["rejected"])
        self.peak_rss = dict(counters["peak_rss"])
        self.guard.restore(counters.get("guard", {}))
        self.device_errors = dict(counters.get("device_errors", {}))
        self.elapsed_before = float(counters["elapsed"])
        # metrics.jsonl may hold a line for a round the checkpoint never saw: rebuild it from
        # the checkpoint, which is the record of what was completed.
        atomic_write_bytes(self.opts.out / "metrics.jsonl",
                           "".join(json.dumps(r) + "\n" for r in self.records).encode())

    # -- sending ---------------------------------------------------------------------------
    def _send_bundle(self, device_id: str) -> None:
        if not self.guard.allow_bundle(device_id, time.monotonic()):
            b = self.opts.limits.bundle
            self._reject(device_id, f"bundle resend refused: {device_id} asked for the bundle "
                                    f"again; at most {b.burst:g} sends, then one every "
                                    f"{1 / b.per_s:.0f} s per device")
            return
        names = tuple(self.bundle_files)
        blobs = tuple(np.frombuffer(self.bundle_files[n], dtype=np.uint8) for n in names)
        n = self.transport.publish(topics.down_device(device_id, "bundle", self.opts.prefix),
                                   BundleFiles(self.run_id, 0, "server", names=names,
                                               blobs=blobs))
        self.bytes_down += n
        log.info("sent bundle (%.1f kB) to %s", n / 1e3, device_id)

    def _announce(self) -> None:
        o = self.opts
        self.transport.publish(
            topics.server_status(o.prefix),
            Presence(self.run_id, -1, "server", state="online",
                     info=server_info(o.model, self.manifest.cut, o.dataset, o.train.to_json())),
            retain=True)

    def _broadcast(self, state: _RoundState) -> None:
        n = self.transport.publish(topics.down_all("round", self.opts.prefix), state.start)
        self.bytes_down += n * len(state.participants)  # the broker delivers one copy to each

    # -- receiving -------------------------------------------------------------------------
    def _reject(self, sender: str, why: str, *, device: bool = True) -> None:
        """Count a rejection; log the first few of each kind per sender (a flood must not
        flood the log); quarantine a device (`sender` came from its own topic) once its
        hostile rejections reach the limit."""
        kind = why.split(":")[0]
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        shown = self._logged.get((sender, kind), 0)
        if shown < LOGGED_PER_KIND:
            log.warning("rejected message from %s: %s", sender, clip_text(why, 400))
        elif shown == LOGGED_PER_KIND:
            log.warning("rejected message from %s: %s; more of this kind from %s are counted, "
                        "not logged (summary.json rejected_by_device)", sender,
                        clip_text(why, 400), sender)
        if shown <= LOGGED_PER_KIND and len(self._logged) < 10_000:
            self._logged[(sender, kind)] = shown + 1
        if device and topics.is_id(sender):
            reason = self.guard.count(sender, kind, why)
            if reason is not None:
                self._quarantine(sender, reason)

    def _within_rate(self, device_id: str, kind: str) -> bool:
        """Take one of the device's tokens for `kind`; a rejection if there is none."""
        if self.guard.allow(device_id, kind, time.monotonic()):
            return True
        rate = self.opts.limits.rates[kind]
        self._reject(device_id, f"rate limited: more than {rate.burst:g} {kind} messages at "
                                f"once or {rate.per_s:g} a second")
        return False

    def _refuse(self, device_id: str, msg: Message, why: str) -> None:
        """A message an honest device may send late or after a restart: forgiven, except
        smashed data beyond its rate (the round's own uploads are bounded in `_smashed`)."""
        if not isinstance(msg, Smashed) or self._within_rate(device_id, "smashed"):
            self._reject(device_id, why)

    def _quarantine(self, device_id: str, reason: str) -> None:
        log.error("QUARANTINED device %s for the rest of run %s: %s. Its messages are dropped "
                  "and counted from now on; it takes part in no round (summary.json and "
                  "metrics.jsonl: quarantined). help: check the board, then revoke its login "
                  "or re-provision it", device_id, self.run_id, clip_text(reason, 300))
        self.ready.pop(device_id, None)
        if self._state is not None and device_id in self._state.participants:
            self._state.gone.add(device_id)

    def _poll(self, timeout: float, state: _RoundState | None, round_idx: int) -> None:
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
        self.bytes_up += inc.nbytes
        try:
            self._dispatch(inc, state, round_idx)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the run
            log.exception("error handling a message on %s", inc.topic)
            self._reject(inc.topic, f"unhandled: {type(exc).__name__}: {exc}", device=False)

    def _dispatch(self, inc: Incoming, state: _RoundState | None, round_idx: int) -> None:
        route = topics.parse_up(inc.topic, self.opts.prefix)
        status_id = topics.parse_status(inc.topic, self.opts.prefix)
        sender = route[0] if route else status_id or inc.topic
        if route or status_id:  # a device's own topic: its limits apply before any work
            if self.guard.drop(sender):
                self.rejected["quarantined"] = self.rejected.get("quarantined", 0) + 1
                return
            kind = route[1] if route else "presence"
            # a participant's first error of a round (why it leaves it) is always heard:
            # rounds can be faster than the error rate
            leaving = kind == "error" and state is not None and \
                sender in state.participants and sender not in state.gone
            if kind != "smashed" and not leaving and not self._within_rate(sender, kind):
                return
        if inc.duplicate:  # a replay on an upload topic counts against its sender; a
            # retained presence arrives once per matching subscription and is not a replay
            if route:
                self._reject(sender, f"duplicate message: {inc.error}")
            return
        if inc.message is None:
            self._reject(sender, f"malformed payload: {inc.error}")
            return
        msg = inc.message
        if status_id is not None:
            if isinstance(msg, Presence) and msg.sender == status_id:
                self._presence(status_id, msg, state)
            else:
                self._reject(status_id, f"spoofed sender: presence from {msg.sender!r}")
            return
        if route is None:
            return
        device_id, kind = route
        if msg.sender != device_id or msg.kind != kind:
            self._reject(device_id, f"spoofed sender: {msg.kind} from {msg.sender!r} on "
                                    f"{device_id}'s {kind} topic")
            return
        member = device_id in self.ready or (state is not None and
                                             device_id in state.participants)
        if isinstance(msg, Join):
            self._join(device_id, msg, state)
        elif isinstance(msg, DeviceError):
            self._device_error(device_id, msg, member or device_id in self.joined, state)
        elif msg.run_id != self.run_id:
            self._refuse(device_id, msg, f"wrong run: {msg.kind} for run "
                                         f"{clip_text(msg.run_id, 40)}")
        elif not member:
            self._refuse(device_id, msg, f"unknown device: {msg.kind} from a device that "
                                         "never joined")
        elif state is not None and msg.round > round_idx:
            self._reject(device_id, f"future round: {msg.kind} for round {msg.round} "
                                    f"during round {round_idx}")
        elif state is None or msg.round != round_idx:
            self._refuse(device_id, msg, f"stale round: {msg.kind} for round {msg.round} "
                                         f"during round {round_idx}")
        elif device_id not in state.participants:
            self._refuse(device_id, msg, f"not a participant: {msg.kind} in round {round_idx}")
        elif isinstance(msg, Smashed):
            self._smashed(device_id, msg, state)
        elif isinstance(msg, Update):
            self._update(device_id, msg, state)

    def _smashed(self, device_id: str, msg: Smashed, state: _RoundState) -> None:
        """Hand a checked upload to the strategy: it trains the server part, and may answer
        with the cut-layer gradient (SplitFed)."""
        if self.strategy.refuses_smashed:
            self._reject(device_id, self.strategy.refuses_smashed)
            return
        cfg = self.opts.train
        count = state.smashed[device_id] = state.smashed.get(device_id, 0) + 1
        budget, slack = smashed_budget(cfg), redelivery_slack(cfg)
        if count > budget + slack:
            self._reject(device_id, f"too many smashed: upload {count} in round "
                                    f"{state.start.round}; its config makes {budget} "
                                    f"(+{slack} redelivered)")
            return
        batch = msg.activations.shape[0] if msg.activations.ndim else 0
        why = check_smashed_step(msg.step, cfg)
        if why is None and batch > cfg.batch_size:
            why = f"batch of {batch} exceeds the round's batch size {cfg.batch_size}"
        why = why or self.trainer.check_batch(msg.activations, msg.labels)
        if why:
            self._reject(device_id, f"bad smashed data: {why}")
            return
        out = self.strategy.on_smashed(device_id, msg.step, msg.activations, msg.labels)
        if out.rejected:
            self._reject(device_id, out.rejected)
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
        self.bytes_down += self.transport.publish(
            topics.down_device(device_id, "grad", self.opts.prefix), reply)

    def _update(self, device_id: str, msg: Update, state: _RoundState) -> None:
        o = self.opts
        if device_id in state.updates:
            self._reject(device_id, "duplicate update: already have this round's update")
            return
        declared = self.ready.get(device_id, self.profiles.get(device_id, {})).get("samples")
        why = check_num_samples(msg.num_samples, declared)
        why = why or check_update(msg.weights, self.theta.size)
        if why is None and float(np.abs(msg.weights).max(initial=0.0)) > o.max_weight_abs:
            why = f"weights exceed |{o.max_weight_abs:g}|"
        if why:
            self._reject(device_id, f"bad update: {why}")
            state.gone.add(device_id)
            return
        weights = msg.weights
        if o.max_update_norm is not None:
            norm = float(np.linalg.norm(weights.astype(np.float64) - self.theta))
            if norm > o.max_update_norm:
                self._reject(device_id, f"update norm: {norm:.3g} from the global weights "
                                        f"exceeds --max-update-norm {o.max_update_norm:g}")
                state.gone.add(device_id)
                return
        if o.clip_update_norm is not None:
            weights, norm = clip_update(weights, self.theta, o.clip_update_norm)
            if norm > o.clip_update_norm:
                state.clipped.append(device_id)
                log.info("round %d: update of %s clipped from %.3g to --clip-update-norm %g",
                         state.start.round, device_id, norm, o.clip_update_norm)
        state.updates[device_id] = DeviceUpdate(device_id, weights, msg.num_samples)
        if msg.telemetry is not None:  # decoded and bounded: every field is there
            state.telemetry[device_id] = msg.telemetry

    def _device_error(self, device_id: str, msg: DeviceError, member: bool,
                      state: _RoundState | None) -> None:
        """Errors travel as messages: one from a device that joined is logged (cut short) and
        takes it out of the round; anyone else's is a rejection, not a log line of its
        choosing."""
        if not member:
            self._reject(device_id, f"error from non-member: "
                                    f"{clip_text(msg.error, NON_MEMBER_ERROR_CHARS)}")
            return
        self.device_errors[device_id] = self.device_errors.get(device_id, 0) + 1
        log.error("device %s reports: %s", device_id, clip_text(msg.error, ERROR_CHARS))
        if state is not None and device_id in state.participants:
            state.gone.add(device_id)

    def _presence(self, device_id: str, msg: Presence, state: _RoundState | None) -> None:
        if msg.state == "online":
            self.online.add(device_id)
        else:
            if device_id in self.online:
                log.warning("device %s went offline", device_id)
            self.online.discard(device_id)
            self.ready.pop(device_id, None)
            if state is not None and device_id in state.participants:
                state.gone.add(device_id)

    def _join(self, device_id: str, msg: Join, state: _RoundState | None) -> None:
        self.online.add(device_id)
        profile = msg.profile.to_json() if msg.profile is not None else {}
        runs = list(msg.profile.algorithms) if msg.profile is not None else None
        if runs is not None and self.algorithm not in runs:
            hint = "--torch" if self.strategy.algorithm.runtime == "torch" else "no --torch"
            self._reject(device_id, f"wrong device kind: it runs {clip_text(str(runs), 80)}, "
                                    f"this server runs {self.algorithm!r}; help: restart it "
                                    f"with {hint}")
            return
        why = check_declared_samples(profile.get("samples"),
                                     self.opts.limits.max_declared_samples)
        if why:
            self._reject(device_id, f"bad join: {why}")
            return
        self.joined.add(device_id)
        if msg.bundle_sha256 == self.bundle_sha:
            if device_id not in self.ready:
                log.info("device %s ready (%s samples, %s, RSS %s MB, profile %s, measured "
                         "%s MB at batch %s)", device_id, profile.get("samples"),
                         profile.get("machine"), profile.get("rss_mb"),
                         profile.get("profile"), profile.get("memory_mb"),
                         profile.get("memory_batch"))
            self.ready[device_id] = profile
            self.profiles[device_id] = dict(profile)
        else:  # it has no bundle, or another one: not ready until it has ours
            self.ready.pop(device_id, None)
            if state is not None and device_id in state.participants:
                state.gone.add(device_id)
            self._send_bundle(device_id)

    # -- the run ---------------------------------------------------------------------------
    def _wait_for_devices(self, need: int) -> None:
        deadline = time.monotonic() + self.opts.join_timeout
        shown = -1
        while len(self.ready) < need:
            if len(self.ready) != shown:
                shown = len(self.ready)
                print(f"waiting for devices: {shown}/{need} ready "
                      f"(broker {self.transport.address}, prefix {self.opts.prefix!r})",
                      flush=True)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(self.ready)}/{need} devices joined within "
                    f"{self.opts.join_timeout:.0f} s; help: start devices with `heron device "
                    f"--broker {self.transport.address} --id ID --data SHARD` or lower --devices")
            self._poll(0.5, None, 0)

    def _run_round(self, r: int) -> dict[str, Any]:
        o = self.opts
        t0 = time.monotonic()
        up0, down0 = self.bytes_up, self.bytes_down
        participants = plan_round(list(self.ready), o.per_round, r, o.seed)
        start = RoundStart(self.run_id, r, "server", weights=self.theta,
                           participants=participants, config=o.train.to_json(),
                           bundle_sha256=self.bundle_sha)
        state = _RoundState(participants, start, o.min_devices)
        self.strategy.begin_round(r)
        self._state = state
        self._broadcast(state)
        deadline = t0 + o.round_timeout
        try:
            while not state.finished() and time.monotonic() < deadline:
                self._poll(0.2, state, r)
        finally:
            self._state = None
        state.server_losses.extend(self.strategy.close_smashed())
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
        ev = evaluate(self.split.client, self.split.server, self.data.x_test, self.data.y_test)
        for dev, tel in state.telemetry.items():
            self.peak_rss[dev] = max(self.peak_rss.get(dev, 0.0), tel.peak_rss_mb)
        self._count_incomplete(self.transport.take_dropped_by_topic(),
                               "dropped incomplete (expired, or over its sender's budget)")
        tel = state.telemetry.values()
        return {
            "round": r,
            "test_accuracy": ev.accuracy,
            "test_loss": ev.loss,
            "server_train_loss": statistics.fmean(state.server_losses)
            if state.server_losses else None,
            "device_local_loss": statistics.fmean(t.loss_mean for t in tel) if tel else None,
            "participants": list(participants),
            "updates": sorted(state.updates),
            "dropped": sorted(state.gone - set(state.updates)),
            "smashed_batches": len(state.server_losses),
            "round_bytes_up": self.bytes_up - up0,
            "round_bytes_down": self.bytes_down - down0,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "device_peak_rss_mb": {d: t.peak_rss_mb for d, t in state.telemetry.items()},
            "device_step_ms": {d: t.step_ms_median for d, t in state.telemetry.items()},
            "device_memory_mb": {d: self.profiles.get(d, {}).get("memory_mb")
                                 for d in participants},  # measured by its dry run at join
            "clipped": state.clipped,
            "rejected": dict(self.rejected),
            "quarantined": dict(self.guard.quarantined),
            "device_errors": dict(self.device_errors),
            "round_seconds": round(time.monotonic() - t0, 3),
        }

    def run(self) -> dict[str, Any]:
        o = self.opts
        t_start = time.monotonic() - self.elapsed_before
        self.transport.start()
        self._announce()
        metrics_path = o.out / "metrics.jsonl"
        if not o.resume:
            metrics_path.unlink(missing_ok=True)
        interrupted = False
        try:
            if self.first_round > o.rounds:
                print(f"run {self.run_id} already completed its {o.rounds} rounds", flush=True)
                return self._finish(t_start)
            o_min = o.min_devices
            self._wait_for_devices(o.devices if o_min is None else min(o.devices, o_min))
            print(f"run {self.run_id}: {o.train.algorithm} {o.model}/{self.manifest.cut} on "
                  f"{o.dataset}, {len(self.ready)} devices, rounds {self.first_round}..{o.rounds}"
                  f", {self.manifest.num_params} device params", flush=True)
            for r in range(self.first_round, o.rounds + 1):
                if len(self.ready) < (o.min_devices or 1):
                    # everyone left (a broker outage drops them all): a round without
                    # participants would close at once, and so would every one after it
                    log.warning("round %d: %d devices ready; waiting up to --join-timeout %.0f "
                                "s for devices to (re)join", r, len(self.ready), o.join_timeout)
                    self._wait_for_devices(o.min_devices or 1)
                rec = self._run_round(r)
                rec["elapsed_seconds"] = round(time.monotonic() - t_start, 3)
                self.records.append(rec)
                # checkpoint first: a round is complete once its checkpoint exists
                self._checkpoint(r, time.monotonic() - t_start)
                append_jsonl(metrics_path, rec)
                print(_round_line(rec, o.rounds), flush=True)
            self.transport.publish(topics.down_all("stop", o.prefix),
                                   Stop(self.run_id, o.rounds, "server", reason="finished"),
                                   wait=10.0)
        except Interrupted as exc:  # the summary below matches the checkpoint
            interrupted = True
            print(f"run {self.run_id}: {exc}; continue with --resume", flush=True)
        finally:
            self.transport.publish(topics.server_status(o.prefix),
                                   Presence(self.run_id, -1, "server", state="offline"),
                                   retain=True, wait=5.0)
            self.transport.stop()
        return self._finish(t_start, interrupted)

    def _count_incomplete(self, by_topic: dict[str, int], what: str) -> None:
        """Chunked messages that never completed, each a rejection of its sender."""
        for topic, n in sorted(by_topic.items()):
            route = topics.parse_up(topic, self.opts.prefix)
            sender = route[0] if route else topics.parse_status(topic, self.opts.prefix)
            for _ in range(n):
                self._reject(sender or topic, f"incomplete message: {what}",
                             device=sender is not None)

    def _finish(self, t_start: float, interrupted: bool = False) -> dict[str, Any]:
        o = self.opts
        self._count_incomplete(self.transport.take_dropped_by_topic(),
                               "dropped incomplete (expired, or over its sender's budget)")
        self._count_incomplete(self.transport.pending_by_topic(), "still incomplete at the end")
        accs = [r["test_accuracy"] for r in self.records]
        summary = {
            "run_id": self.run_id,
            "algorithm": o.train.algorithm,
            "model": o.model,
            "cut": self.manifest.cut,
            "dataset": o.dataset,
            "devices": sorted(self.ready) if self.ready else o.devices,
            "num_devices": o.devices,
            "rounds": o.rounds,
            "completed_rounds": len(self.records),
            "interrupted": interrupted,
            "deterministic": o.deterministic,
            "final_test_accuracy": accs[-1] if accs else None,
            "test_accuracy_per_round": accs,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "device_peak_rss_mb": self.peak_rss,
            "device_profiles": self.profiles,  # join profiles: board profile, measured memory
            "device_params": self.manifest.num_params,
            "rejected": dict(self.rejected),
            "rejected_by_device": self.guard.by_device,
            # device -> why, for the rest of the run; quarantine_dropped: messages dropped since
            "quarantined": dict(self.guard.quarantined),
            "quarantine_dropped": dict(self.guard.dropped),
            "device_errors": dict(self.device_errors),
            "config": {"train": o.train.to_json(), "server_optimizer": o.server_optimizer,
                       "server_lr": o.server_lr, "weighting": o.weighting, "seed": o.seed,
                       "per_round": o.per_round, "min_devices": o.min_devices,
                       "round_timeout": o.round_timeout, "aggregate": o.aggregate,
                       "trim": o.trim, "max_update_norm": o.max_update_norm,
                       "clip_update_norm": o.clip_update_norm,
                       "limits": o.limits.to_json(), "deterministic": o.deterministic},
            "wall_seconds": round(time.monotonic() - t_start, 3),
        }
        write_json(o.out / "summary.json", summary)
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
            "counters": plain({"bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                               "rejected": self.rejected, "peak_rss": self.peak_rss,
                               "elapsed": elapsed, "guard": self.guard.state(),
                               "device_errors": self.device_errors}),
        })


def _round_line(rec: dict[str, Any], rounds: int) -> str:
    rss = [v for v in rec["device_peak_rss_mb"].values() if v is not None]
    steps = [v for v in rec["device_step_ms"].values() if v is not None]
    return (f"round {rec['round']:>3}/{rounds}  test acc {rec['test_accuracy']:.4f}  "
            f"test loss {rec['test_loss']:.4f}  "
            f"devices {len(rec['updates'])}/{len(rec['participants'])}  "
            f"up {rec['bytes_up'] / 1e6:.2f} MB  down {rec['bytes_down'] / 1e6:.2f} MB  "
            f"device peak RSS {max(rss) if rss else float('nan'):.0f} MB  "
            f"step {statistics.median(steps) if steps else float('nan'):.2f} ms  "
            f"{rec['round_seconds']:.1f} s")
