"""What the server accepts from each device: rate limits, per-round budgets, quarantine.

Pure bookkeeping over explicit clocks, tested without a broker; `server.members` asks it
before doing any work for a message, `server.loop` before using a round's upload. A device is
known by its topic, which a provisioned broker's ACL binds to the device's own login, so what
it counts is what that login did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.algorithms import algorithm
from edge_runtime.protocol import TrainConfig
from server.aggregate import check_update

# Rejection kinds (the text before the first ':' of a rejection) that an honest device can
# cause through no fault of its own: late messages after a round closed, messages for a run
# or a round the server no longer has after a restart, a redelivered update or smashed step,
# a bundle it asked for too often while crash-looping, a redelivered chunk, an upload cut off
# when it died. They are counted but never quarantine.
LENIENT = frozenset({"stale round", "wrong run", "unknown device", "not a participant",
                     "duplicate update", "duplicate smashed", "duplicate message",
                     "bundle resend refused", "update norm", "incomplete message",
                     "replay mismatch"})

MAX_DECLARED_SAMPLES = 100_000_000  # a join declaring more samples is refused
ERROR_CHARS = 500  # a member's error text is cut to this many characters
NON_MEMBER_ERROR_CHARS = 100  # what is shown of an error from a device that is not a member
MAX_TRACKED = 10_000  # devices with their own buckets; beyond, one shared bucket (open brokers)
SHARED = "*"


@dataclass(frozen=True)
class Rate:
    """A token bucket: `burst` messages at once, refilled at `per_s` a second."""

    per_s: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.per_s > 0 and self.burst >= 1):
            raise ValueError(f"a rate needs per_s > 0 and burst >= 1, got {self}")


def _default_rates() -> dict[str, Rate]:
    # Honest traffic, per device: a join when the server (re)appears, after the bundle and on
    # a reconnect; one update and at most one error a round; presence on connect/leave.
    # Smashed uploads for the round in progress are bounded by `smashed_budget` instead (a
    # SplitFed device at full speed would outrun any fixed rate); this bucket only stops a
    # flood of smashed messages that are refused before that count (stale rounds, other
    # runs, non-members).
    # A weights reply answers the server's request after a replay mismatch: one a round.
    return {"join": Rate(0.5, 5), "error": Rate(1.0, 5), "update": Rate(2.0, 10),
            "weights_reply": Rate(2.0, 10),
            "presence": Rate(1.0, 10), "smashed": Rate(200.0, 400)}


@dataclass(frozen=True)
class Limits:
    """The server's per-device limits (defaults fit honest devices with a wide margin)."""

    quarantine_after: int = 10  # hostile rejections before a device is quarantined; 0: never
    rates: dict[str, Rate] = field(default_factory=_default_rates)
    bundle: Rate = Rate(1 / 60, 3)  # bundle sends per device: 3 at once, then one a minute
    max_declared_samples: int = MAX_DECLARED_SAMPLES

    def __post_init__(self) -> None:
        if self.quarantine_after < 0:
            raise ValueError(f"--quarantine-after must be >= 0 (0: never), got "
                             f"{self.quarantine_after}")

    def to_json(self) -> dict[str, object]:
        return {"quarantine_after": self.quarantine_after,
                "rates": {k: [r.per_s, r.burst] for k, r in sorted(self.rates.items())},
                "bundle": [self.bundle.per_s, self.bundle.burst],
                "max_declared_samples": self.max_declared_samples}


class Bucket:
    def __init__(self, rate: Rate, now: float) -> None:
        self.rate, self.tokens, self.at = rate, float(rate.burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate.burst, self.tokens + (now - self.at) * self.rate.per_s)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def upload_interval(cfg: TrainConfig) -> int:
    """Steps between a device's smashed uploads: k, or every step for SplitFed (whose
    devices wait for the server's gradient of each step)."""
    return 1 if algorithm(cfg.algorithm).waits_for_gradient else cfg.upload_every


def smashed_budget(cfg: TrainConfig) -> int:
    """Smashed uploads a device makes in one round: steps 0, k, 2k, ... below h."""
    return math.ceil(cfg.local_steps / upload_interval(cfg))


def redelivery_slack(cfg: TrainConfig) -> int:
    """Smashed messages beyond the budget tolerated in a round (redelivered steps)."""
    return max(2, smashed_budget(cfg) // 4)


def check_smashed_step(step: int, cfg: TrainConfig) -> str | None:
    """Why a smashed upload's step cannot be one the round's config produces, or None."""
    k = upload_interval(cfg)
    if not 0 <= step < cfg.local_steps or step % k:
        return f"step {step} is not one of the round's upload steps (0, {k}, ... < " \
               f"{cfg.local_steps})"
    return None


def check_smashed(count: int, step: int, batch: int, cfg: TrainConfig,
                  round_idx: int) -> str | None:
    """Why a device's `count`-th smashed upload of a round is refused before the server
    trains on it (the whole rejection, its kind first), or None."""
    budget, slack = smashed_budget(cfg), redelivery_slack(cfg)
    if count > budget + slack:
        return (f"too many smashed: upload {count} in round {round_idx}; its config makes "
                f"{budget} (+{slack} redelivered)")
    why = check_smashed_step(step, cfg)
    if why is None and batch > cfg.batch_size:
        why = f"batch of {batch} exceeds the round's batch size {cfg.batch_size}"
    return f"bad smashed data: {why}" if why else None


def check_declared_samples(samples: object, limit: int = MAX_DECLARED_SAMPLES) -> str | None:
    """Why a join's declared sample count is unusable, or None."""
    if not isinstance(samples, int) or isinstance(samples, bool):
        return f"declared samples {samples!r} is not an integer"
    if not 1 <= samples <= limit:
        return f"declared samples {samples} outside 1..{limit}"
    return None


def check_num_samples(num_samples: object, declared: int | None) -> str | None:
    """Why an update's sample count (its averaging weight) is unusable, or None: a whole
    number from 1 to what the device declared when it joined."""
    if not isinstance(num_samples, int) or isinstance(num_samples, bool):
        return f"sample count {num_samples!r} is not an integer"
    if declared is None:
        return "no sample count was declared at join"
    if not 1 <= num_samples <= declared:
        return f"sample count {num_samples} outside 1..{declared} (declared at join)"
    return None


def check_device_update(weights: np.ndarray, num_samples: object, declared: int | None,
                        theta: np.ndarray, max_weight_abs: float,
                        max_update_norm: float | None) -> str | None:
    """Why a round's update is refused (the whole rejection, its kind first), or None: its
    sample count, shape, finiteness, weight bound and distance from the global weights."""
    why = check_num_samples(num_samples, declared)
    why = why or check_update(weights, theta.size)
    if why is None and float(np.abs(weights).max(initial=0.0)) > max_weight_abs:
        why = f"weights exceed |{max_weight_abs:g}|"
    if why:
        return f"bad update: {why}"
    if max_update_norm is not None:
        norm = float(np.linalg.norm(weights.astype(np.float64) - theta))
        if norm > max_update_norm:
            return (f"update norm: {norm:.3g} from the global weights exceeds "
                    f"--max-update-norm {max_update_norm:g}")
    return None


def clip_text(text: str, limit: int) -> str:
    """At most `limit` characters, printable (repr escapes newlines: no forged log lines)."""
    shown = text[:limit]
    cut = f"... ({len(text)} chars)" if len(text) > limit else ""
    return repr(shown)[1:-1] + cut


class Guard:
    """Per-device rate limits, hostile-rejection counts and the quarantine list of one run."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._bundle: dict[str, Bucket] = {}
        self.hostile: dict[str, int] = {}  # device -> hostile rejections
        self.by_device: dict[str, dict[str, int]] = {}  # device -> kind -> rejections
        self.quarantined: dict[str, str] = {}  # device -> reason, for the rest of the run
        self.dropped: dict[str, int] = {}  # device -> messages dropped while quarantined

    def allow(self, device: str, kind: str, now: float) -> bool:
        """Whether `device` may send one more `kind` message now (token bucket)."""
        rate = self.limits.rates.get(kind)
        if rate is None:
            return True
        who = device if (device, kind) in self._buckets or \
            len(self._buckets) < MAX_TRACKED else SHARED
        bucket = self._buckets.get((who, kind))
        if bucket is None:
            bucket = self._buckets[(who, kind)] = Bucket(rate, now)
        return bucket.take(now)

    def allow_bundle(self, device: str, now: float) -> bool:
        """Whether the server may send `device` the bundle again now."""
        who = device if device in self._bundle or len(self._bundle) < MAX_TRACKED else SHARED
        bucket = self._bundle.get(who)
        if bucket is None:
            bucket = self._bundle[who] = Bucket(self.limits.bundle, now)
        return bucket.take(now)

    def count(self, device: str, kind: str, why: str) -> str | None:
        """Record a rejection; returns the reason if it has just quarantined the device."""
        who = device if device in self.by_device or len(self.by_device) < MAX_TRACKED \
            else SHARED
        per = self.by_device.setdefault(who, {})
        per[kind] = per.get(kind, 0) + 1
        if kind in LENIENT or who == SHARED or device in self.quarantined:
            return None
        self.hostile[device] = self.hostile.get(device, 0) + 1
        after = self.limits.quarantine_after
        if after and self.hostile[device] >= after:
            reason = f"{self.hostile[device]} rejected messages, the last: {why}"
            self.quarantined[device] = reason[:300]
            return self.quarantined[device]
        return None

    def drop(self, device: str) -> bool:
        """True (and counted) if `device` is quarantined: its message is to be dropped."""
        if device not in self.quarantined:
            return False
        self.dropped[device] = self.dropped.get(device, 0) + 1
        return True

    def state(self) -> dict[str, object]:
        """What a checkpoint keeps, so a resumed run keeps its quarantine."""
        return {"hostile": dict(self.hostile), "by_device": {d: dict(k) for d, k in
                                                              self.by_device.items()},
                "quarantined": dict(self.quarantined), "dropped": dict(self.dropped)}

    def restore(self, saved: dict) -> None:
        self.hostile = {str(k): int(v) for k, v in saved.get("hostile", {}).items()}
        self.by_device = {str(d): {str(k): int(n) for k, n in kinds.items()}
                          for d, kinds in saved.get("by_device", {}).items()}
        self.quarantined = {str(k): str(v) for k, v in saved.get("quarantined", {}).items()}
        self.dropped = {str(k): int(v) for k, v in saved.get("dropped", {}).items()}


# The server answers each smashed batch with a gradient from one shared model, in the order
# the batches arrive, so no fixed order can be imposed without stalling the devices:
# refused under --deterministic. (SplitFed V1 keeps one server copy per device, trained in
# that device's step order, so it is deterministic as it is.)
def deterministic_conflict(name: str, min_devices: int | None) -> str | None:
    """Why --deterministic cannot hold with these options, or None (no torch here: the
    CLI asks before anything heavy is imported)."""
    alg = algorithm(name)
    if alg.waits_for_gradient and not alg.server_copy_per_device:
        return (f"--deterministic does not apply to --algorithm {name}: its server "
                "answers every device's batches from one model in the order they arrive; "
                "help: an algorithm with one server copy per device (sflv1) is deterministic")
    if min_devices is not None:
        return ("--deterministic cannot be used with --min-devices: a round would close with "
                "whichever updates arrived first; help: drop --min-devices")
    return None
