"""The server's per-device limits: rate buckets, round budgets, sample counts and quarantine,
checked on explicit clocks without a broker."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_runtime.protocol import TrainConfig
from server import policy
from server.policy import (
    Guard,
    Limits,
    Rate,
    check_declared_samples,
    check_device_update,
    check_num_samples,
    check_smashed,
    check_smashed_step,
    clip_text,
    redelivery_slack,
    smashed_budget,
)

# --- token buckets ------------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    g = Guard(Limits(rates={"join": Rate(per_s=2.0, burst=3)}))
    assert [g.allow("dev-0", "join", 0.0) for _ in range(4)] == [True, True, True, False]
    assert not g.allow("dev-0", "join", 0.4)  # 0.8 of a token back
    assert g.allow("dev-0", "join", 0.5)  # one token: 0.5 s at 2 a second
    assert not g.allow("dev-0", "join", 0.5)
    assert [g.allow("dev-0", "join", 100.0) for _ in range(4)] == [True, True, True, False]


def test_buckets_are_per_device_and_per_kind() -> None:
    g = Guard(Limits(rates={"join": Rate(1.0, 1), "error": Rate(1.0, 1)}))
    assert g.allow("dev-0", "join", 0.0) and not g.allow("dev-0", "join", 0.0)
    assert g.allow("dev-1", "join", 0.0)  # another device is not slowed by dev-0
    assert g.allow("dev-0", "error", 0.0)  # nor another kind
    assert g.allow("dev-0", "update", 0.0)  # a kind without a rate is not limited


def test_untracked_senders_share_one_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an open broker anyone can invent device ids: past MAX_TRACKED they share a
    bucket, so the server's bookkeeping stays bounded."""
    monkeypatch.setattr(policy, "MAX_TRACKED", 2)
    g = Guard(Limits(rates={"join": Rate(1.0, 1)}))
    assert g.allow("a", "join", 0.0) and g.allow("b", "join", 0.0)
    assert g.allow("c", "join", 0.0) and not g.allow("d", "join", 0.0)
    assert len(g._buckets) == 3


def test_bundle_sends_are_limited_per_device() -> None:
    g = Guard(Limits(bundle=Rate(per_s=1 / 60, burst=2)))
    assert [g.allow_bundle("dev-0", t) for t in (0.0, 1.0, 2.0, 30.0)] == \
        [True, True, False, False]
    assert g.allow_bundle("dev-1", 2.0)
    assert g.allow_bundle("dev-0", 62.0)


def test_default_rates_fit_the_honest_protocol() -> None:
    limits = Limits()
    cfg = TrainConfig()  # 20 smashed uploads a round: all fit one burst
    assert limits.rates["smashed"].burst >= 2 * (smashed_budget(cfg) + redelivery_slack(cfg))
    assert limits.rates["join"].burst >= 3  # server online, bundle received, reconnect
    assert limits.bundle.burst >= 2


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="quarantine-after"):
        Limits(quarantine_after=-1)
    with pytest.raises(ValueError, match="burst"):
        Rate(1.0, 0.5)
    with pytest.raises(ValueError, match="per_s"):
        Rate(0.0, 5)


# --- quarantine ---------------------------------------------------------------------------


def test_hostile_rejections_quarantine_a_device_once() -> None:
    g = Guard(Limits(quarantine_after=3))
    assert g.count("dev-0", "bad update", "bad update: x") is None
    assert g.count("dev-0", "malformed payload", "malformed payload: y") is None
    reason = g.count("dev-0", "bad smashed data", "bad smashed data: z")
    assert reason is not None and "3 rejected" in reason and "bad smashed data: z" in reason
    assert g.quarantined == {"dev-0": reason}
    assert g.count("dev-0", "bad update", "again") is None  # reported once
    assert g.by_device["dev-0"] == {"bad update": 2, "malformed payload": 1,
                                    "bad smashed data": 1}
    assert g.drop("dev-0") and g.drop("dev-0") and not g.drop("dev-1")
    assert g.dropped == {"dev-0": 2}


def test_lenient_rejections_never_quarantine() -> None:
    """What an honest device does after a restart or a closed round is counted, not held
    against it."""
    g = Guard(Limits(quarantine_after=2))
    for kind in sorted(policy.LENIENT):
        for _ in range(5):
            assert g.count("dev-0", kind, f"{kind}: ...") is None
    assert g.quarantined == {} and g.hostile == {}


def test_quarantine_can_be_switched_off() -> None:
    g = Guard(Limits(quarantine_after=0))
    for _ in range(100):
        assert g.count("dev-0", "bad update", "bad update: x") is None
    assert g.quarantined == {} and g.hostile["dev-0"] == 100


def test_guard_state_survives_a_checkpoint_round_trip() -> None:
    import json

    g = Guard(Limits(quarantine_after=1))
    g.count("dev-0", "bad update", "bad update: x")
    g.count("dev-1", "stale round", "stale round: y")
    g.drop("dev-0")
    h = Guard(Limits(quarantine_after=1))
    h.restore(json.loads(json.dumps(g.state())))
    assert h.state() == g.state() and h.drop("dev-0")


# --- per-message checks -------------------------------------------------------------------


def test_smashed_budget_is_the_rounds_upload_steps() -> None:
    for h, k in [(40, 2), (41, 2), (1, 1), (10, 3), (600, 10)]:
        cfg = TrainConfig(local_steps=h, upload_every=k)
        steps = [s for s in range(h) if s % k == 0]  # as runtime.train_round uploads
        assert smashed_budget(cfg) == len(steps) == math.ceil(h / k)
        assert all(check_smashed_step(s, cfg) is None for s in steps)
        assert redelivery_slack(cfg) >= 2


@pytest.mark.parametrize("alg", ["sflv1", "sflv2"])
def test_splitfed_uploads_every_step(alg: str) -> None:
    """A SplitFed device sends every step's activations and waits for the gradient."""
    cfg = TrainConfig(algorithm=alg, local_steps=40, upload_every=4)
    assert smashed_budget(cfg) == 40
    assert all(check_smashed_step(s, cfg) is None for s in range(40))
    assert check_smashed_step(40, cfg) is not None


@pytest.mark.parametrize("step", [-2, 1, 3, 40, 42, 10**12])
def test_a_step_the_round_never_uploads_is_refused(step: int) -> None:
    why = check_smashed_step(step, TrainConfig(local_steps=40, upload_every=2))
    assert why is not None and f"step {step}" in why


def test_a_rounds_smashed_uploads_beyond_budget_and_slack_are_too_many() -> None:
    cfg = TrainConfig(local_steps=40, upload_every=2)
    most = smashed_budget(cfg) + redelivery_slack(cfg)
    assert check_smashed(most, 0, 8, cfg, 3) is None
    why = check_smashed(most + 1, 0, 8, cfg, 3) or ""
    assert why.startswith("too many smashed:") and "round 3" in why


def test_a_smashed_batch_off_step_or_over_the_batch_size_is_bad_data() -> None:
    cfg = TrainConfig(local_steps=40, upload_every=2, batch_size=16)
    assert (check_smashed(1, 1, 8, cfg, 1) or "").startswith("bad smashed data: step 1")
    assert "exceeds the round's batch size 16" in (check_smashed(1, 0, 17, cfg, 1) or "")


def test_an_update_is_checked_for_samples_shape_bounds_and_distance() -> None:
    theta = np.zeros(4, np.float32)

    def check(weights: np.ndarray, samples: object = 10, norm: float | None = None) -> str:
        return check_device_update(weights, samples, 10, theta, 1e4, norm) or ""

    ok = np.full(4, 0.5, np.float32)
    assert check(ok) == "" and check(ok, norm=1.0) == ""  # |ok - theta| = 1
    assert check(ok, samples=11).startswith("bad update: sample count 11")
    assert check(np.zeros(3, np.float32)).startswith("bad update: weights have shape")
    assert check(np.array([np.nan, 0, 0, 0], np.float32)).startswith("bad update:")
    assert check(np.full(4, 2e4, np.float32)) == "bad update: weights exceed |10000|"
    assert check(ok, norm=0.5).startswith("update norm: 1 from the global weights exceeds "
                                          "--max-update-norm 0.5")


@pytest.mark.parametrize("value", [0, -5, 10**8 + 1, 1.5, float("nan"), "100", True, None])
def test_declared_samples_must_be_a_bounded_integer(value: object) -> None:
    assert check_declared_samples(value) is not None


def test_declared_samples_in_range_pass() -> None:
    assert check_declared_samples(1) is None and check_declared_samples(10**8) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30, -1, 0, 2.0, True, "5",
                                   101, 10**30])
def test_sample_count_must_be_an_integer_up_to_what_was_declared(value: object) -> None:
    why = check_num_samples(value, 100)
    assert why is not None


def test_sample_count_within_the_declared_passes() -> None:
    assert check_num_samples(100, 100) is None and check_num_samples(1, 100) is None
    assert "declared" in (check_num_samples(5, None) or "")


def test_clip_text_cuts_and_escapes() -> None:
    assert clip_text("short", 10) == "short"
    assert clip_text("a" * 30, 10) == "a" * 10 + "... (30 chars)"
    assert "\n" not in clip_text("line\nINFO forged log line", 100)
