"""The device's network loop: join, receive the bundle, train the rounds it is picked for.

All MQTT traffic of a device goes through this one loop; training itself is
`runtime.train_round`, which knows nothing about the network.

Whom a device obeys. It acts only on the kinds the server sends, each on its own topic
(`server_kinds`: the retained server presence, ``down/{own id}/bundle|grad``,
``down/all/round|stop``) with sender "server", and only for the run it joined: the run id
comes from the server's online presence on the retained server status topic and from nowhere
else. A bundle, round, gradient or stop for another run, a kind on the wrong topic or a
payload that does not decode is ignored, counted in `Device.ignored` and logged, never a
crash (only a bundle of the joined run that cannot be received or verified ends the device:
it reports why to the server and exits 4). What that proves about the sender depends on the
broker:

- provisioned (`heron devices provision`): the broker refuses anonymous clients, its ACL
  lets only the server's account write under ``down/`` and ``server/status`` while each
  device writes only its own ``up/`` and ``status/`` topics, and client ids are the user
  names (`tests/test_security.py` checks each against a real Mosquitto). So whatever a
  device acts on was published with the server's credentials, and the run is the one that
  account announced last: that is the server's identity. With ``--tls`` the device also
  checks the broker's certificate against the fleet's CA; without TLS a machine on the
  network path could pose as the broker.
- an open broker: anyone who connects can publish as the server (the run id is in its
  retained presence for all to read); the run-id check then only keeps stale and other
  runs' traffic out.

Either way a bundle cannot make the device read or write outside the bundle's folder
(`edge_runtime.bundle`: external data confinement, checked before any session exists), and
a message larger than the device's memory budget can hold is refused at its first chunk
(`message_limit`).
"""

from __future__ import annotations

import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil

from edge_runtime.algorithms import ONNX_ALGORITHMS, algorithm
from edge_runtime.bundle import (
    GRAPH_DATA,
    Bundle,
    BundleError,
    bundle_from_files,
    default_bundle_cache,
    load_bundle,
    store_bundle_files,
)
from edge_runtime.data import load_shard
from edge_runtime.profiles import (
    MEMORY_EXIT_CODE,
    MemoryVerdict,
    Profile,
    check_bundle_memory,
    memory_budget,
)
from edge_runtime.protocol import (
    MAX_CHUNK_PAYLOAD,
    MAX_MESSAGE_BYTES,
    BundleFiles,
    DeviceError,
    Gradient,
    Join,
    Message,
    Presence,
    RoundStart,
    Smashed,
    Stop,
    Update,
    announced_train,
    new_msg_id,
    topics,
)
from edge_runtime.runtime import (
    LocalModel,
    RoundResult,
    TrainConfig,
    peak_rss_mb,
    train_round,
    use_process_pool,
)
from edge_runtime.transport import RECONNECTED, Credentials, Endpoint, Incoming, Transport
from edge_runtime.zo import BlockSampler

log = logging.getLogger("heron.device")


@dataclass(frozen=True)
class DeviceOptions:
    broker: str
    device_id: str
    data: Path
    prefix: str = topics.DEFAULT_PREFIX
    bundle: Path | None = None  # a local bundle instead of the server's
    threads: int | None = None
    credentials: Credentials | None = None
    wait_server_s: float = 600.0  # give up if no server shows up for this long
    profile: Profile | None = None  # board profile: memory budget (and default threads)
    # where bundles from the server are stored when their graph data must be on disk to be
    # memory-mapped (None: bundle.default_bundle_cache())
    bundle_cache: Path | None = None


class RoundAborted(Exception):
    """The round cannot go on (no gradient from the server, server gone); no update is sent."""


class DeviceExit(Exception):
    """Raised to end the device loop with a message and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def announced_config(info: object) -> TrainConfig | None:
    """The run's training config from the server's presence, for the join-time memory check:
    None from a server that predates it, or (with a warning) when it is malformed."""
    try:
        obj = announced_train(info)
        if obj is None:
            return None
        batch = obj.get("batch_size")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch_size {batch!r} is not a positive integer")
        return TrainConfig.from_json(obj)
    except (TypeError, ValueError) as exc:
        log.warning("ignoring the training config in the server's presence (%s); the join-time "
                    "memory check uses batch size %d", exc, TrainConfig().batch_size)
        return None


def message_limit(profile: Profile | None) -> int:
    """The largest message, in bytes, this device takes: half of what its memory budget
    (`profiles.memory_budget`) leaves above what the process holds now, since a bundle
    verified in memory is held twice for a moment (the message and its files); at least one
    chunk, so presences and small rounds always pass, and at most the codec's limit. A
    bundle over it is refused at its first chunk, before any of it is held."""
    budget_mb, _ = memory_budget(profile)
    room = int(budget_mb * 2**20) - psutil.Process().memory_info().rss
    return max(MAX_CHUNK_PAYLOAD, min(MAX_MESSAGE_BYTES, room // 2))


def server_kinds(device_id: str, prefix: str) -> dict[str, type[Message]]:
    """topic -> the one message kind the server sends there (module doc)."""
    return {topics.server_status(prefix): Presence,
            topics.down_device(device_id, "bundle", prefix): BundleFiles,
            topics.down_device(device_id, "grad", prefix): Gradient,
            topics.down_all("round", prefix): RoundStart,
            topics.down_all("stop", prefix): Stop}


def device_endpoint(device_id: str, prefix: str) -> Endpoint:
    """The device on the bus: its downlinks, broadcasts and the server's presence; an
    offline presence as its will."""
    return Endpoint(f"heron-{device_id}", topics.device_subscriptions(device_id, prefix),
                    (topics.device_status(device_id, prefix),
                     Presence("", -1, device_id, state="offline")))


def mqtt_transport(opts: DeviceOptions, max_message_bytes: int) -> Transport:
    """The device's MQTT connection, as `heron device` makes it."""
    from edge_runtime.transport.mqtt import MqttTransport

    ep = device_endpoint(opts.device_id, opts.prefix)
    return MqttTransport(opts.broker, ep.client_id, ep.subscriptions, will=ep.will,
                         credentials=opts.credentials, max_message_bytes=max_message_bytes)


def _profile(opts: DeviceOptions, n: int, threads: int | None) -> dict[str, object]:
    return {"samples": n, "python": platform.python_version(), "machine": platform.machine(),
            "onnxruntime": ort.__version__, "numpy": np.__version__, "threads": threads,
            "rss_mb": round(peak_rss_mb(), 1)}


class Device:
    """The ONNX Runtime device (heron, frozen). `devices.torch_device.TorchDevice` reuses
    this loop and overrides only the model hooks (`_make_model`, `_train`, ...)."""

    algorithms: tuple[str, ...] = ONNX_ALGORITHMS
    checks_memory = True  # dry-run memory check against the board profile (ORT device)

    def __init__(self, opts: DeviceOptions, transport: Transport | None = None) -> None:
        """`transport`: where its messages go (default: MQTT to `opts.broker`); one made
        elsewhere should use `device_endpoint` and `message_limit`."""
        topics.validate_id(opts.device_id)
        self.opts = opts
        self.x, self.y = load_shard(opts.data)
        self.bundle: Bundle | None = load_bundle(opts.bundle) if opts.bundle else None
        self.threads: int | None = None
        self.model: object | None = None  # LocalModel here; a torch split on TorchDevice
        self.memory: dict[int, float] = {}  # batch -> measured peak RSS MB (this bundle)
        self.memory_verdict: MemoryVerdict | None = None  # the check made at join
        self.announced: TrainConfig | None = None  # the run's config, from the server's presence
        # block-wise ZO: (run id, sampler) where the next round's block draws start
        self.block_sampler: tuple[str, BlockSampler] | None = None
        if self.bundle is not None:
            self._load_model(self.bundle)
        self.run_id: str | None = None
        self.rounds_done = 0
        self.last_update: Update | None = None  # resent if the server asks for its round again
        self.pending: list[Message] = []  # messages that arrived while a round was busy
        self.ignored: dict[str, int] = {}  # why -> how many server messages were not acted on
        p, dev = opts.prefix, opts.device_id
        self.kinds = server_kinds(dev, p)
        self.max_message_bytes = message_limit(opts.profile)
        self.transport = transport if transport is not None else \
            mqtt_transport(opts, self.max_message_bytes)

    # -- model hooks (overridden by the torch device) ------------------------------------
    @staticmethod
    def prepare_process(opts: DeviceOptions) -> None:
        """Process-wide setup before the device starts: one ONNX Runtime thread pool for
        all its sessions (`runtime.use_process_pool`)."""
        use_process_pool(opts.threads)

    def _make_model(self, bundle: Bundle) -> tuple[object, int | None]:
        """The local model for a verified bundle, checked against the shard; and threads."""
        model = LocalModel(bundle, self.opts.threads)
        model.check_data(self.x, self.y)
        return model, model.threads

    def _expected_weights(self, cfg: TrainConfig) -> int:
        """Length of the global weight vector a round carries for this algorithm."""
        assert self.bundle is not None
        return self.bundle.manifest.num_params

    def _train(self, msg: RoundStart, cfg: TrainConfig,
               send_smashed: Callable[[int, np.ndarray, np.ndarray], None]) -> RoundResult:
        assert isinstance(self.model, LocalModel)
        # the block sampler's per-block energies carry over between the rounds of one run on
        # one bundle: later rounds draw the blocks that moved the loss more often
        carried = self.block_sampler
        sampler = carried[1] if carried is not None and carried[0] == msg.run_id else None
        result = train_round(self.model, msg.weights.astype(np.float32), self.x, self.y, cfg,
                             round_idx=msg.round, device_id=self.opts.device_id,
                             on_smashed=send_smashed, block_sampler=sampler)
        if result.block_sampler is not None:
            start = sampler.probs() if sampler is not None else None
            log.info("%s: round %d block draw probabilities %s -> %s", self.opts.device_id,
                     msg.round, "uniform" if start is None else np.round(start, 3).tolist(),
                     np.round(result.block_sampler.probs(), 3).tolist())
        self.block_sampler = ((msg.run_id, result.block_sampler)
                              if result.block_sampler is not None else None)
        return result

    def _load_model(self, bundle: Bundle) -> None:
        self.model, self.threads = self._make_model(bundle)
        self.memory, self.memory_verdict = {}, None
        self.block_sampler = None
        log.info("%s: bundle %s/%s ready (%d trainable params, %s threads)",
                 self.opts.device_id, bundle.manifest.model, bundle.manifest.cut,
                 bundle.manifest.num_params, self.threads)

    def _check_memory(self, batch: int, theta: np.ndarray,
                      cfg: TrainConfig | None) -> MemoryVerdict:
        """Real dry-run steps at growing batches up to `batch`, against the budget."""
        assert isinstance(self.model, LocalModel)
        before = len(self.memory)
        verdict = check_bundle_memory(self.model, theta, self.x, self.y, batch,
                                      self.opts.profile, known=self.memory, cfg=cfg)
        log.log(logging.INFO if len(self.memory) > before or not verdict.fits else logging.DEBUG,
                "%s: memory check: %s", self.opts.device_id, verdict.message())
        return verdict

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
        profile = _profile(self.opts, len(self.y), self.threads if self.model else None)
        profile["algorithms"] = list(self.algorithms)
        profile["profile"] = self.opts.profile.name if self.opts.profile else "none"
        if self.memory_verdict is not None:
            profile.update(self.memory_verdict.join_fields())
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
        elif isinstance(msg, Gradient) and not self._other_run(msg):
            log.debug("%s: a gradient for round %d step %d came after its round", dev,
                      msg.round, msg.step)

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
            verdict = self._check_memory(cfg.batch_size, msg.weights.astype(np.float32), cfg)
            if not verdict.fits:
                self._refuse(f"round {msg.round} refused: {verdict.message()}")
        smashed_topic = topics.up(dev, "smashed", p)

        def send_smashed(step: int, act: np.ndarray, labels: np.ndarray) -> None:
            t.publish(smashed_topic, Smashed(msg.run_id, msg.round, dev, step=step,
                                             activations=act, labels=labels))

        bytes_in0, bytes_out0 = t.bytes_in, t.bytes_out
        t0 = time.perf_counter()
        try:
            result = self._train(msg, cfg, send_smashed)
        except (ValueError, FloatingPointError, RoundAborted) as exc:
            self._report(f"round {msg.round} failed: {exc}")
            return
        telemetry = {
            "peak_rss_mb": round(peak_rss_mb(), 2),
            "step_ms_median": round(statistics.median(result.step_ms), 3),
            "step_ms_mean": round(statistics.fmean(result.step_ms), 3),
            "round_s": round(time.perf_counter() - t0, 3),
            "loss_first": result.losses[0], "loss_last": result.losses[-1],
            "loss_mean": float(np.mean(result.losses)),
            "steps": cfg.local_steps, "smashed_sent": result.smashed_sent,
            "threads": self.threads, "algorithm": cfg.algorithm,
            "bytes_in": t.bytes_in - bytes_in0, "bytes_out": t.bytes_out - bytes_out0,
        }
        try:  # the codec's bounds hold on the way out too (a NaN loss, say)
            update = Update(msg.run_id, msg.round, dev, weights=result.theta,
                            num_samples=len(self.y), telemetry=telemetry)
        except ValueError as exc:
            self._report(f"round {msg.round} failed: its update is not valid: {exc}")
            return
        self.last_update = update
        t.publish(topics.up(dev, "update", p), self.last_update, wait=30.0)
        self.rounds_done += 1
        log.info("%s: round %d done: local loss %.4f -> %.4f, %.1f ms/step, peak RSS %.1f MB",
                 dev, msg.round, result.losses[0], result.losses[-1],
                 telemetry["step_ms_median"], telemetry["peak_rss_mb"])


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


def run_device(opts: DeviceOptions, device_cls: type[Device] = Device) -> int:
    """Entry point used by `heron device` (`device_cls`: TorchDevice for `--torch`)."""
    try:
        device_cls.prepare_process(opts)
        device = device_cls(opts)
        return device.run()
    except (BundleError, ValueError, OSError) as exc:  # BrokerError is an OSError
        print(f"heron device: {exc}", file=sys.stderr)
        return 2
