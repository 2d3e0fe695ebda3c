"""Who is in a run and what gets through (`server.members`), without a broker or a loop:
messages go in as the transport delivers them, the loop's two callbacks are recorded."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.algorithms import algorithm
from edge_runtime.protocol import (
    DeviceError,
    Join,
    JoinProfile,
    Message,
    Presence,
    RoundStart,
    Smashed,
    Update,
    topics,
)
from edge_runtime.transport import Incoming
from server.members import LOGGED_PER_KIND, Members
from server.policy import Limits
from server.round_state import RoundState

P = topics.DEFAULT_PREFIX
RUN = "run0"
SHA = "a" * 64


class Loop:
    """What the loop hands `Members`: its bundle sends and round departures, recorded."""

    def __init__(self, quarantine_after: int = 10) -> None:
        self.sent: list[str] = []
        self.left: list[str] = []
        self.members = Members(Limits(quarantine_after=quarantine_after), P, RUN,
                               algorithm("heron"), SHA, send_bundle=self.sent.append,
                               leave_round=self.left.append)

    def up(self, msg: Message, state: RoundState | None = None,
           round_idx: int = 0) -> tuple[str, Smashed | Update] | None:
        return self.members.admit(Incoming(topics.up(msg.sender, msg.kind, P), msg, 100),
                                  state, round_idx)

    def join(self, dev: str, sha: str | None = SHA, samples: int = 50) -> None:
        profile = JoinProfile(samples=samples, algorithms=("heron", "cse-fsl"))
        assert self.up(Join(RUN, 0, dev, profile=profile, bundle_sha256=sha)) is None


def a_round(*participants: str, r: int = 1) -> RoundState:
    return RoundState(participants, RoundStart(RUN, r, "server", participants=participants))


def test_a_join_with_the_bundle_makes_a_device_ready() -> None:
    loop = Loop()
    loop.join("dev-0")
    m = loop.members
    assert m.ready["dev-0"]["samples"] == 50 and m.declared_samples("dev-0") == 50
    assert loop.sent == [] and m.rejected == {}


def test_a_join_without_the_bundle_gets_it_and_is_not_ready() -> None:
    loop = Loop()
    loop.join("dev-0", sha=None)
    assert loop.sent == ["dev-0"] and "dev-0" not in loop.members.ready
    assert "dev-0" in loop.members.joined


def test_bundle_resends_are_limited() -> None:
    loop = Loop()
    for _ in range(5):
        loop.join("dev-0", sha=None)
    assert loop.sent == ["dev-0"] * 3  # the default burst, then one a minute
    assert loop.members.rejected == {"bundle resend refused": 2}


def test_a_join_from_another_kind_of_device_is_refused() -> None:
    loop = Loop()
    profile = JoinProfile(samples=50, algorithms=("sflv1",))
    loop.up(Join(RUN, 0, "dev-0", profile=profile, bundle_sha256=SHA))
    assert loop.members.ready == {} and loop.members.rejected == {"wrong device kind": 1}


def test_a_participants_upload_gets_through_to_the_loop() -> None:
    loop = Loop()
    loop.join("dev-0")
    msg = Update(RUN, 1, "dev-0", weights=np.zeros(3, np.float32))
    assert loop.up(msg, a_round("dev-0"), 1) == ("dev-0", msg)


def test_uploads_for_another_round_run_or_device_are_counted_not_passed() -> None:
    loop = Loop()
    loop.join("dev-0")
    loop.join("dev-1")
    state = a_round("dev-0", r=2)
    w = np.zeros(3, np.float32)
    assert loop.up(Update(RUN, 1, "dev-0", weights=w), state, 2) is None
    assert loop.up(Update(RUN, 3, "dev-0", weights=w), state, 2) is None
    assert loop.up(Update("other", 2, "dev-0", weights=w), state, 2) is None
    assert loop.up(Update(RUN, 2, "dev-1", weights=w), state, 2) is None
    assert loop.up(Update(RUN, 2, "dev-9", weights=w), state, 2) is None
    assert loop.members.rejected == {"stale round": 1, "future round": 1, "wrong run": 1,
                                     "not a participant": 1, "unknown device": 1}


def test_a_spoofed_sender_is_refused() -> None:
    loop = Loop()
    msg = Update(RUN, 1, "dev-1", weights=np.zeros(3, np.float32))
    inc = Incoming(topics.up("dev-0", "update", P), msg, 100)
    assert loop.members.admit(inc, a_round("dev-0"), 1) is None
    assert loop.members.rejected == {"spoofed sender": 1}


def test_offline_presence_takes_a_device_out_of_the_round() -> None:
    loop = Loop()
    loop.join("dev-0")
    inc = Incoming(topics.device_status("dev-0", P),
                   Presence(RUN, -1, "dev-0", state="offline"), 50)
    loop.members.admit(inc, a_round("dev-0"), 1)
    assert loop.left == ["dev-0"] and "dev-0" not in loop.members.ready


def test_a_members_error_is_heard_a_strangers_is_a_rejection() -> None:
    loop = Loop()
    loop.join("dev-0")
    loop.up(DeviceError(RUN, 1, "dev-0", error="out of memory"), a_round("dev-0"), 1)
    loop.up(DeviceError(RUN, 1, "dev-9", error="x" * 300), a_round("dev-0"), 1)
    assert loop.members.device_errors == {"dev-0": 1} and loop.left == ["dev-0"]
    assert loop.members.rejected == {"error from non-member": 1}


def test_hostile_rejections_quarantine_a_device_and_drop_its_messages() -> None:
    loop = Loop(quarantine_after=3)
    loop.join("dev-0")
    for _ in range(3):
        loop.members.reject("dev-0", "bad update: weights contain NaN or Inf")
    assert "dev-0" in loop.members.guard.quarantined and loop.left == ["dev-0"]
    assert "dev-0" not in loop.members.ready
    msg = Update(RUN, 1, "dev-0", weights=np.zeros(3, np.float32))
    assert loop.up(msg, a_round("dev-0"), 1) is None
    assert loop.members.rejected["quarantined"] == 1


def test_rejections_are_logged_a_few_times_per_kind_then_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = Loop(quarantine_after=0)
    for _ in range(LOGGED_PER_KIND + 5):
        loop.members.reject("dev-0", "malformed payload: bad bytes")
    logged = [r for r in caplog.records if "rejected message from dev-0" in r.getMessage()]
    assert len(logged) == LOGGED_PER_KIND + 1  # the last one says the rest are counted
    assert loop.members.rejected == {"malformed payload": LOGGED_PER_KIND + 5}


def test_counters_survive_a_checkpoint_round_trip() -> None:
    loop = Loop(quarantine_after=1)
    loop.members.reject("dev-0", "bad update: weights contain NaN or Inf")
    loop.members.device_errors["dev-1"] = 2
    again = Loop(quarantine_after=1)
    again.members.restore(loop.members.counters())
    assert again.members.counters() == loop.members.counters()
    assert "dev-0" in again.members.guard.quarantined
