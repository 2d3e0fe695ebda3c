"""The device's loop: join, receive the bundle, train the rounds it is picked for.

All traffic of a device goes through this one loop, over whatever `Transport` it is given
(MQTT by default, `bus.mqtt_transport`); training itself is a subclass's `_train`
(`runtime.train_round` on `Device`), which knows nothing about the network. Which messages
the loop acts on, and why that is safe, is `bus`'s doc.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from edge_runtime.algorithms import algorithm
from edge_runtime.bundle import (
    GRAPH_DATA,
    Bundle,
    bundle_from_files,
    default_bundle_cache,
    load_bundle,
    store_bundle_files,
)
from edge_runtime.data import load_shard
from edge_runtime.device.bus import message_limit, mqtt_transport, server_kinds
from edge_runtime.device.options import DeviceExit, DeviceOptions, RoundAborted
from edge_runtime.device.records import announced_config, join_profile, round_telemetry
from edge_runtime.manifest import BundleError
from edge_runtime.profiles import MEMORY_EXIT_CODE, MemoryVerdict
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
    TrainConfig,
    Update,
    WeightsReply,
    WeightsRequest,
    new_msg_id,
    topics,
)
from edge_runtime.replay import weights_hash
from edge_runtime.runtime import RoundResult
from edge_runtime.transport import RECONNECTED, Incoming, Transport
from edge_runtime.uplink import make_uplink

log = logging.getLogger("heron.device")


class DeviceLoop:
    """The device's loop, whatever model it trains. A subclass gives the model hooks
    (`_make_model`, `_expected_weights`, `_train`, and `_check_memory` where
    `checks_memory`): `Device` with ONNX Runtime, `devices.torch_device.TorchDevice` with
    torch."""

    algorithms: tuple[str, ...] = ()  # what it can run, said at join
    checks_memory = False  # dry-run memory check against the board profile, at join and round
    uplink_thread = True  # smashed data coded and published beside the step (uplink.py)

    def __init__(self, opts: DeviceOptions, transport: Transport | None = None) -> None:
        """`transport`: where its messages go (default: MQTT to `opts.broker`); one made
        elsewhere should use `device_endpoint` and `message_limit`."""
        topics.validate_id(opts.device_id)
        self.opts = opts
        self.x, self.y = load_shard(opts.data)
        self.bundle: Bundle | None = load_bundle(opts.bundle) if opts.bundle else None
        self.threads: int | None = None
        self.model: object | None = None  # set by `_make_model` once there is a bundle
        self.memory_verdict: MemoryVerdict | None = None  # the check made at join
        self.announced: TrainConfig | None = None  # the run's config, from the server's presence
        if self.bundle is not None:
            self._load_model(self.bundle)
        self.run_id: str | None = None
        self.rounds_done = 0
        self.last_update: Update | None = None  # resent if the server asks for its round again
        # --device-sync replay: the last round's weights, sent if its log does not replay
        self.last_weights: WeightsReply | None = None
        self.pending: list[Message] = []  # messages that arrived while a round was busy
        self.ignored: dict[str, int] = {}  # why -> how many server messages were not acted on
        p, dev = opts.prefix, opts.device_id
        self.kinds = server_kinds(dev, p)
        self.max_message_bytes = message_limit(opts.profile)
        self.transport = transport if transport is not None else \
            mqtt_transport(opts, self.max_message_bytes)

    # -- model hooks ---------------------------------------------------------------------
    @staticmethod
    def prepare_process(opts: DeviceOptions) -> None:
        """Process-wide setup before the device starts (`run_device`)."""

    def _make_model(self, bundle: Bundle) -> tuple[object, int | None]:
        """The local model for a verified bundle, checked against the shard; and threads."""
        raise NotImplementedError

    def _expected_weights(self, cfg: TrainConfig) -> int:
        """Length of the global weight vector a round carries for this algorithm."""
        raise NotImplementedError

    def _train(self, msg: RoundStart, cfg: TrainConfig,
               send_smashed: Callable[[int, np.ndarray, np.ndarray], None]) -> RoundResult:
        """One round's local training from the round's global weights."""
        raise NotImplementedError

    def _check_memory(self, batch: int, theta: np.ndarray,
                      cfg: TrainConfig | None) -> MemoryVerdict:
        """Real dry-run steps at growing batches up to `batch`, against the budget."""
        raise NotImplementedError

    def _load_model(self, bundle: Bundle) -> None:
        self.model, self.threads = self._make_model(bundle)
        self.memory_verdict = None
        log.info("%s: bundle %s/%s ready (%d trainable params, %s threads)",
                 self.opts.device_id, bundle.manifest.model, bundle.manifest.cut,
                 bundle.manifest.num_params, self.threads)

    def _refuse(self, why: str) -> None:
        """Say no instead of being OOM-killed: tell the server, then stop."""
        self._report(why)
        raise DeviceExit(why, MEMORY_EXIT_CODE)

    def _join(self) -> None:
        if self.checks_memory and self.model is not None and self.bundle is not None and \
                self.memory_verdict is None:
            # before saying ready: measure at the run's batch size (the default from a server
            # that does not announce it); refuse only if nothing fits, each round's start
            # checks its own batch again
            cfg = self.announced
            batch = cfg.batch_size if cfg is not None else TrainConfig().batch_size
            self.memory_verdict = self._check_memory(batch, self.bundle.weights, cfg)
            if self.memory_verdict.largest_fitting is None:
                self._refuse(f"bundle refused: {self.memory_verdict.message()}")
        sha = self.bundle.manifest.files.get("train.onnx") if self.bundle else None
        profile = join_profile(len(self.y), self.threads if self.model else None,
                               self.algorithms, self.opts.profile, self.memory_verdict)
        self.transport.publish(topics.up(self.opts.device_id, "join", self.opts.prefix),
                               Join(self.run_id or "", -1, self.opts.device_id,
                                    profile=profile, bundle_sha256=sha))

    def run(self) -> int:
        t = self.transport
        t.start()
        dev, p = self.opts.device_id, self.opts.prefix
        t.publish(topics.device_status(dev, p), Presence("", -1, dev, state="online"),
                  retain=True)
        log.info("%s: connected to %s with %d samples; waiting for a server",
                 dev, t.address, len(self.y))
        last_seen = time.monotonic()
        try:
            while True:
                if self.pending:
                    self._handle(self.pending.pop(0))
                    continue
                inc = t.get(timeout=1.0)
                if inc is None:
                    if self.run_id is None and \
                            time.monotonic() - last_seen > self.opts.wait_server_s:
                        raise DeviceExit("no server appeared; giving up", 3)
                    continue
                if self._receive(inc):
                    last_seen = time.monotonic()
        except DeviceExit as exc:
            log.info("%s: %s", dev, exc)
            return exc.code
        finally:
            if self.ignored:
                log.warning("%s: ignored server messages: %s", dev, self.ignored)
            t.publish(topics.device_status(dev, p), Presence("", -1, dev, state="offline"),
                      retain=True, wait=5.0)
            t.stop()

    def _reannounce(self) -> None:
        """After a broker drop: our retained presence and the server's view may be gone."""
        dev, p = self.opts.device_id, self.opts.prefix
        log.info("%s: reconnected to the broker; announcing again", dev)
        self.transport.publish(topics.device_status(dev, p),
                               Presence("", -1, dev, state="online"), retain=True)
        if self.run_id is not None:
            self._join()

    def _receive(self, inc: Incoming) -> bool:
        """One item from the transport: act on it if the server sent it; whether it did."""
        if inc.topic == RECONNECTED:
            self._reannounce()
            return False
        msg = self._accept(inc)
        if msg is not None:
            self._handle(msg)
        return msg is not None

    def _ignore(self, why: str, detail: str) -> None:
        """Count a server message not acted on; log the 1st, 2nd, 4th, ... of each kind."""
        n = self.ignored[why] = self.ignored.get(why, 0) + 1
        if n & (n - 1) == 0:
            log.warning("%s: ignoring %s (%s; %d so far)", self.opts.device_id, why, detail, n)

    def _accept(self, inc: Incoming) -> Message | None:
        """The message if it is the kind the server sends on its topic, from "server";
        else None, counted. A bundle that cannot be received (over `max_message_bytes`, or
        undecodable) while in a run is refused as a bad bundle is: reported, and the device
        stops (`_refuse_bundle`)."""
        want = self.kinds.get(inc.topic)
        msg = inc.message
        if inc.duplicate:  # a QoS 1 redelivery of what was already applied
            return None
        if msg is None:
            if want is BundleFiles and self.run_id is not None:
                self._refuse_bundle(f"its message was refused ({inc.error}); this device "
                                    f"takes messages of at most {self.max_message_bytes} "
                                    "bytes, from its memory budget; help: a --profile with "
                                    "a larger budget, or an earlier cut")
            self._ignore("undecodable payload", f"on {inc.topic}: {inc.error}")
            return None
        if want is None or not isinstance(msg, want) or msg.sender != "server":
            self._ignore("message on the wrong topic",
                         f"{msg.kind} from {msg.sender!r} on {inc.topic}")
            return None
        return msg

    def _other_run(self, msg: Message) -> bool:
        """Whether `msg` is for a run other than the one joined (then it is counted)."""
        if self.run_id is not None and msg.run_id == self.run_id:
            return False
        self._ignore(f"{msg.kind} for another run",
                     f"run {msg.run_id!r}, joined {self.run_id!r}")
        return True

    def _handle(self, msg: Message) -> None:
        """Act on a message `_accept` let through."""
        dev = self.opts.device_id
        if isinstance(msg, Presence):
            if msg.state == "online":  # a new server session (or a resumed one): (re)join
                self.run_id = msg.run_id
                announced = announced_config(msg.info)
                if announced != self.announced:  # check again at this run's batch size
                    self.announced, self.memory_verdict = announced, None
                log.info("%s: server online, run %s; joining", dev, msg.run_id)
                self._join()
            elif msg.state == "offline" and self.run_id is not None and \
                    msg.run_id == self.run_id:
                log.info("%s: server went offline; waiting for it to come back", dev)
                self.run_id = None
        elif isinstance(msg, BundleFiles):
            if not self._other_run(msg):
                self._on_bundle(msg)
        elif isinstance(msg, RoundStart):
            if self._other_run(msg) or dev not in msg.participants:
                return
            last = self.last_update
            if last is not None and (last.run_id, last.round) == (msg.run_id, msg.round):
                # A new publication, so a new message id: the receiver dedupes redeliveries
                # by id and may have dropped the first copy (e.g. a restarted server).
                log.info("%s: round %d asked again; resending its update", dev, msg.round)
                self.transport.publish(topics.up(dev, "update", self.opts.prefix),
                                       replace(last, msg_id=new_msg_id()))
                return
            self._on_round(msg)
        elif isinstance(msg, Stop) and not self._other_run(msg):
            raise DeviceExit(f"server ended the run ({msg.reason}) after "
                             f"{self.rounds_done} rounds here", 0)
        elif isinstance(msg, WeightsRequest) and not self._other_run(msg):
            self._send_weights(msg)
        elif isinstance(msg, Gradient) and not self._other_run(msg):
            log.debug("%s: a gradient for round %d step %d came after its round", dev,
                      msg.round, msg.step)

    def _send_weights(self, msg: WeightsRequest) -> None:
        """The server could not replay this round's log: answer with the weights it stands
        for (kept since the round ended), or, for any other round, nothing (the server drops
        the update at its deadline)."""
        dev, last = self.opts.device_id, self.last_weights
        if last is None or (last.run_id, last.round) != (msg.run_id, msg.round):
            self._ignore("weights request for a round this device does not hold",
                         f"round {msg.round}")
            return
        log.warning("%s: the server could not replay round %d (%s); sending its weights", dev,
                    msg.round, msg.reason)
        self.transport.publish(topics.up(dev, "weights_reply", self.opts.prefix),
                               replace(last, msg_id=new_msg_id()), wait=30.0)

    def _refuse_bundle(self, why: str) -> None:
        self._report(f"bundle rejected: {why}")
        raise DeviceExit(f"cannot use the server's bundle: {why}", 4)

    def _on_bundle(self, msg: BundleFiles) -> None:
        try:
            if GRAPH_DATA in msg.names:  # its frozen tensors are mapped from disk, not copied
                # written straight from the message's buffer: no copy of the 76 MB in memory
                root = store_bundle_files(msg.views(),
                                          self.opts.bundle_cache or default_bundle_cache())
                msg.release()  # its buffer goes now, not when the loop lets go of it
                bundle = load_bundle(root)
                log.info("%s: bundle stored in %s", self.opts.device_id, root)
            else:
                bundle = bundle_from_files(msg.files())
            self._load_model(bundle)
        except (BundleError, ValueError) as exc:
            self._refuse_bundle(str(exc))
        self.bundle = bundle
        self._join()  # a join that names our bundle's sha means "ready"

    def _report(self, error: str) -> None:
        log.error("%s: %s", self.opts.device_id, error)
        self.transport.publish(topics.up(self.opts.device_id, "error", self.opts.prefix),
                               DeviceError(self.run_id or "", -1, self.opts.device_id,
                                           error=error), wait=5.0)

    def _on_round(self, msg: RoundStart) -> None:
        dev, p, t = self.opts.device_id, self.opts.prefix, self.transport
        if self.model is None or self.bundle is None:
            log.warning("%s: round %d started before the bundle arrived; skipping",
                        dev, msg.round)
            return
        try:
            cfg = TrainConfig.from_json(msg.config)
            if cfg.algorithm not in self.algorithms:
                hint = ("start the device with `heron device --torch` (needs torch)"
                        if algorithm(cfg.algorithm).runtime == "torch" else
                        "start the device without --torch")
                raise ValueError(f"the server runs {cfg.algorithm!r} but this device runs "
                                 f"{', '.join(self.algorithms)}; help: {hint}")
            expected = self._expected_weights(cfg)
            if msg.weights.shape != (expected,):
                raise ValueError(f"global weights have shape {msg.weights.shape}, expected "
                                 f"({expected},) for {cfg.algorithm} on this bundle")
        except (TypeError, ValueError) as exc:
            self._report(f"round {msg.round} rejected: {exc}")
            return
        if self.checks_memory:
            try:  # a real step at the round's weights: it fails where the round would
                verdict = self._check_memory(cfg.batch_size, msg.weights.astype(np.float32),
                                             cfg)
            except (ValueError, FloatingPointError) as exc:
                self._report(f"round {msg.round} rejected: its memory check failed: {exc}")
                return
            if not verdict.fits:
                self._refuse(f"round {msg.round} refused: {verdict.message()}")
        smashed_topic = topics.up(dev, "smashed", p)

        def send_smashed(step: int, act: np.ndarray, labels: np.ndarray) -> None:
            t.publish(smashed_topic, Smashed.coded(msg.run_id, msg.round, dev, step, act,
                                                   labels, cfg.smashed_codec))

        bytes_in0, bytes_out0 = t.bytes_in, t.bytes_out
        t0 = time.perf_counter()
        try:  # smashed data coded and published off the step (uplink.py), all before the update
            with make_uplink(send_smashed, self.uplink_thread) as uplink:
                result = self._train(msg, cfg, uplink.send)
                uplink.flush()
        except (ValueError, FloatingPointError, RoundAborted) as exc:
            self._report(f"round {msg.round} failed: {exc}")
            return
        try:  # the codec's bounds hold on the way out too (a NaN loss, say)
            telemetry = round_telemetry(result, cfg, time.perf_counter() - t0, self.threads,
                                        t.bytes_in - bytes_in0, t.bytes_out - bytes_out0)
            sent = result.theta if algorithm(cfg.algorithm).sends_weights else \
                np.zeros(0, np.float32)  # frozen: the server has them already
            update = Update(msg.run_id, msg.round, dev, weights=sent,
                            num_samples=len(self.y), telemetry=telemetry)
            if cfg.device_sync == "replay":  # the log instead of the weights (README)
                update = replace(update, weights=np.zeros(0, np.float32), seeds=result.seeds,
                                 projected=result.projected,
                                 weights_hash=weights_hash(result.theta))
                self.last_weights = WeightsReply(msg.run_id, msg.round, dev,
                                                 weights=result.theta)
        except ValueError as exc:
            self._report(f"round {msg.round} failed: its update is not valid: {exc}")
            return
        self.last_update = update
        t.publish(topics.up(dev, "update", p), self.last_update, wait=30.0)
        self.rounds_done += 1
        log.info("%s: round %d done: local loss %.4f -> %.4f, %.1f ms/step, peak RSS %.1f MB",
                 dev, msg.round, result.losses[0], result.losses[-1],
                 telemetry.step_ms_median, telemetry.peak_rss_mb)

    def await_gradient(self, round_idx: int, step: int, timeout: float) -> Gradient:
        """SplitFed: block until the server's cut-layer gradient for (round, step) arrives.

        Runs inside training, so it keeps the loop's duties: a Stop ends the device, a lost
        server or broker aborts the round (the server re-runs or skips it), other messages
        wait for the next round.
        """
        t, dev = self.transport, self.opts.device_id
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RoundAborted(f"no gradient from the server for step {step} within "
                                   f"{timeout:.0f} s")
            inc = t.get(timeout=min(left, 1.0))
            if inc is None:
                continue
            if inc.topic == RECONNECTED:
                self._reannounce()
                continue
            msg = self._accept(inc)
            if msg is None:
                continue
            if isinstance(msg, Presence):
                if msg.state == "offline" and msg.run_id == self.run_id:
                    self.run_id = None
                    raise RoundAborted("the server went offline mid-round")
                if msg.state == "online" and msg.run_id != self.run_id:
                    self.pending.append(msg)  # a new run: joined by the main loop
                    raise RoundAborted(f"the server started run {msg.run_id}")
                continue
            if self._other_run(msg):
                continue
            if isinstance(msg, Gradient) and (msg.round, msg.step) == (round_idx, step):
                return msg
            if isinstance(msg, Stop):
                raise DeviceExit(f"server ended the run ({msg.reason}) after "
                                 f"{self.rounds_done} rounds here", 0)
            if isinstance(msg, RoundStart) and msg.round != round_idx:
                self.pending.append(msg)  # handled by the main loop once this round ends
                raise RoundAborted(f"the server moved on to round {msg.round}")
            log.debug("%s: ignoring %s while waiting for a gradient", dev, msg.kind)
