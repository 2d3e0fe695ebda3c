"""Who is in a run and what gets through: joins, presence, members' errors, rate limits,
and every rejection and quarantine.

`server.loop.Server` holds one `Members` and hands it every incoming message (`admit`); what
comes back is a participant's upload for the round in progress, for the loop to act on.
It sends nothing and holds no round: the bundle goes out through the loop's `send_bundle`,
and a device that leaves the round in progress (offline, quarantined, an error, another
bundle) is handed to the loop's `leave_round`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge_runtime.algorithms import Algorithm
from edge_runtime.protocol import (
    DeviceError,
    Join,
    Message,
    Presence,
    Smashed,
    Update,
    WeightsReply,
    topics,
)
from edge_runtime.transport import Incoming
from server.policy import (
    ERROR_CHARS,
    NON_MEMBER_ERROR_CHARS,
    Guard,
    Limits,
    check_declared_samples,
    clip_text,
)

if TYPE_CHECKING:
    from server.round_state import RoundState

log = logging.getLogger("heron.server")

LOGGED_PER_KIND = 3  # rejections of one kind logged per sender; the rest are only counted


class Members:
    """The devices of one run: who is online, ready (with its join profile) or joined, and
    what each was refused."""

    def __init__(self, limits: Limits, prefix: str, run_id: str, algorithm: Algorithm,
                 bundle_sha: str, *, send_bundle: Callable[[str], None],
                 leave_round: Callable[[str], None]) -> None:
        self.limits = limits
        self.prefix = prefix
        self.run_id = run_id
        self.algorithm = algorithm
        self.bundle_sha = bundle_sha
        self.send_bundle = send_bundle  # sends the run's bundle to a device
        self.leave_round = leave_round  # takes a device out of the round in progress, if any
        self.online: set[str] = set()
        self.ready: dict[str, dict[str, Any]] = {}  # device id -> profile from its join
        self.profiles: dict[str, dict[str, Any]] = {}  # every device that was ever ready
        self.joined: set[str] = set()  # devices whose join was accepted (ready, or sent the
        # bundle): their error reports are heard, e.g. why they refused the bundle
        self.rejected: dict[str, int] = {}
        self.guard = Guard(limits)
        self.device_errors: dict[str, int] = {}  # error messages from members, per device
        self._logged: dict[tuple[str, str], int] = {}  # (sender, kind) -> rejections logged

    # -- what a checkpoint keeps -----------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """The rejection counts, quarantine and errors a resumed run continues from."""
        return {"rejected": self.rejected, "guard": self.guard.state(),
                "device_errors": self.device_errors}

    def restore(self, counters: dict[str, Any]) -> None:
        self.rejected = dict(counters["rejected"])
        self.guard.restore(counters.get("guard", {}))
        self.device_errors = dict(counters.get("device_errors", {}))

    # -- what gets through -----------------------------------------------------------------
    def admit(self, inc: Incoming, state: RoundState | None,
              round_idx: int) -> tuple[str, Smashed | Update | WeightsReply] | None:
        """A participant's upload for round `round_idx` in progress (`state`), for the loop to
        act on; anything else is handled here (a join, presence, a member's error) or counted
        as a rejection."""
        route = topics.parse_up(inc.topic, self.prefix)
        status_id = topics.parse_status(inc.topic, self.prefix)
        sender = route[0] if route else status_id or inc.topic
        if route or status_id:  # a device's own topic: its limits apply before any work
            if self.drop_quarantined(sender):
                return None
            kind = route[1] if route else "presence"
            # a participant's first error of a round (why it leaves it) is always heard:
            # rounds can be faster than the error rate
            leaving = kind == "error" and state is not None and \
                sender in state.participants and sender not in state.gone
            if kind != "smashed" and not leaving and not self.within_rate(sender, kind):
                return None
        if inc.duplicate:  # a replay on an upload topic counts against its sender; a
            # retained presence arrives once per matching subscription and is not a replay
            if route:
                self.reject(sender, f"duplicate message: {inc.error}")
            return None
        if inc.message is None:
            self.reject(sender, f"malformed payload: {inc.error}")
            return None
        msg = inc.message
        if status_id is not None:
            if isinstance(msg, Presence) and msg.sender == status_id:
                self.presence(status_id, msg)
            else:
                self.reject(status_id, f"spoofed sender: presence from {msg.sender!r}")
            return None
        if route is None:
            return None
        device_id, kind = route
        if msg.sender != device_id or msg.kind != kind:
            self.reject(device_id, f"spoofed sender: {msg.kind} from {msg.sender!r} on "
                                   f"{device_id}'s {kind} topic")
            return None
        member = device_id in self.ready or (state is not None and
                                             device_id in state.participants)
        if isinstance(msg, Join):
            self.join(device_id, msg)
        elif isinstance(msg, DeviceError):
            self.device_error(device_id, msg, member)
        elif msg.run_id != self.run_id:
            self.refuse(device_id, msg, f"wrong run: {msg.kind} for run "
                                        f"{clip_text(msg.run_id, 40)}")
        elif not member:
            self.refuse(device_id, msg, f"unknown device: {msg.kind} from a device that "
                                        "never joined")
        elif state is not None and msg.round > round_idx:
            self.reject(device_id, f"future round: {msg.kind} for round {msg.round} "
                                   f"during round {round_idx}")
        elif state is None or msg.round != round_idx:
            self.refuse(device_id, msg, f"stale round: {msg.kind} for round {msg.round} "
                                        f"during round {round_idx}")
        elif device_id not in state.participants:
            self.refuse(device_id, msg, f"not a participant: {msg.kind} in round {round_idx}")
        elif isinstance(msg, (Smashed, Update, WeightsReply)):
            return device_id, msg
        return None

    # -- rejections ------------------------------------------------------------------------
    def reject(self, sender: str, why: str, *, device: bool = True) -> None:
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
                self.quarantine(sender, reason)

    def within_rate(self, device_id: str, kind: str) -> bool:
        """Take one of the device's tokens for `kind`; a rejection if there is none."""
        if self.guard.allow(device_id, kind, time.monotonic()):
            return True
        rate = self.limits.rates[kind]
        self.reject(device_id, f"rate limited: more than {rate.burst:g} {kind} messages at "
                               f"once or {rate.per_s:g} a second")
        return False

    def refuse(self, device_id: str, msg: Message, why: str) -> None:
        """A message an honest device may send late or after a restart: forgiven, except
        smashed data beyond its rate (the round's own uploads are bounded by
        `server.policy.check_smashed`)."""
        if not isinstance(msg, Smashed) or self.within_rate(device_id, "smashed"):
            self.reject(device_id, why)

    def quarantine(self, device_id: str, reason: str) -> None:
        log.error("QUARANTINED device %s for the rest of run %s: %s. Its messages are dropped "
                  "and counted from now on; it takes part in no round (summary.json and "
                  "metrics.jsonl: quarantined). help: check the board, then revoke its login "
                  "or re-provision it", device_id, self.run_id, clip_text(reason, 300))
        self.ready.pop(device_id, None)
        self.leave_round(device_id)

    def drop_quarantined(self, device_id: str) -> bool:
        """True (and counted) if `device_id` is quarantined: its message is to be dropped."""
        if not self.guard.drop(device_id):
            return False
        self.rejected["quarantined"] = self.rejected.get("quarantined", 0) + 1
        return True

    def allow_bundle(self, device_id: str) -> bool:
        """Whether the bundle may be sent to `device_id` again now; a rejection if not."""
        if self.guard.allow_bundle(device_id, time.monotonic()):
            return True
        b = self.limits.bundle
        self.reject(device_id, f"bundle resend refused: {device_id} asked for the bundle "
                               f"again; at most {b.burst:g} sends, then one every "
                               f"{1 / b.per_s:.0f} s per device")
        return False

    def count_incomplete(self, by_topic: dict[str, int], what: str) -> None:
        """Chunked messages that never completed, each a rejection of its sender."""
        for topic, n in sorted(by_topic.items()):
            route = topics.parse_up(topic, self.prefix)
            sender = route[0] if route else topics.parse_status(topic, self.prefix)
            for _ in range(n):
                self.reject(sender or topic, f"incomplete message: {what}",
                            device=sender is not None)

    # -- who is in -------------------------------------------------------------------------
    def declared_samples(self, device_id: str) -> Any:
        """The sample count the device declared at its join (an update's weight cap)."""
        return self.ready.get(device_id, self.profiles.get(device_id, {})).get("samples")

    def device_error(self, device_id: str, msg: DeviceError, member: bool) -> None:
        """Errors travel as messages: one from a device that joined is logged (cut short) and
        takes it out of the round; anyone else's is a rejection, not a log line of its
        choosing."""
        if not (member or device_id in self.joined):
            self.reject(device_id, f"error from non-member: "
                                   f"{clip_text(msg.error, NON_MEMBER_ERROR_CHARS)}")
            return
        self.device_errors[device_id] = self.device_errors.get(device_id, 0) + 1
        log.error("device %s reports: %s", device_id, clip_text(msg.error, ERROR_CHARS))
        self.leave_round(device_id)

    def presence(self, device_id: str, msg: Presence) -> None:
        if msg.state == "online":
            self.online.add(device_id)
        else:
            if device_id in self.online:
                log.warning("device %s went offline", device_id)
            self.online.discard(device_id)
            self.ready.pop(device_id, None)
            self.leave_round(device_id)

    def join(self, device_id: str, msg: Join) -> None:
        """A device with our bundle is ready; one with none, or another one, is sent ours
        and is not ready until it has it."""
        self.online.add(device_id)
        profile = msg.profile.to_json() if msg.profile is not None else {}
        runs = list(msg.profile.algorithms) if msg.profile is not None else None
        name = self.algorithm.name
        if runs is not None and name not in runs:
            hint = "--torch" if self.algorithm.runtime == "torch" else "no --torch"
            self.reject(device_id, f"wrong device kind: it runs {clip_text(str(runs), 80)}, "
                                   f"this server runs {name!r}; help: restart it with {hint}")
            return
        why = check_declared_samples(profile.get("samples"), self.limits.max_declared_samples)
        if why:
            self.reject(device_id, f"bad join: {why}")
            return
        self.joined.add(device_id)
        if msg.bundle_sha256 != self.bundle_sha:
            self.ready.pop(device_id, None)
            self.leave_round(device_id)
            if self.allow_bundle(device_id):
                self.send_bundle(device_id)
            return
        if device_id not in self.ready:
            log.info("device %s ready (%s samples, %s, RSS %s MB, profile %s, measured "
                     "%s MB at batch %s)", device_id, profile.get("samples"),
                     profile.get("machine"), profile.get("rss_mb"),
                     profile.get("profile"), profile.get("memory_mb"),
                     profile.get("memory_batch"))
        self.ready[device_id] = profile
        self.profiles[device_id] = dict(profile)
