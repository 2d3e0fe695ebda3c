"""server.evaluation (when and on what the server evaluates) and server.tensorboard (the
per-round scalars), without a federation; tests/server/test_loop_inprocess.py runs both in
a real loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from server.evaluation import EvalPlan, all_cores, evaluate_round
from server.tensorboard import RoundLog, round_scalars
from server.trainer import evaluate


def test_every_nth_round_and_always_the_last_is_evaluated() -> None:
    plan = EvalPlan(every=3)
    assert [r for r in range(1, 8) if plan.evaluates(r, 7)] == [3, 6, 7]
    assert all(EvalPlan().evaluates(r, 5) for r in range(1, 6))


def test_the_subset_is_seeded_the_same_each_round_and_the_last_round_takes_all() -> None:
    plan = EvalPlan(every=1, limit=40, seed=5)
    a, b = plan.subset(300, 1, 9), plan.subset(300, 4, 9)
    assert a is not None and b is not None
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 40 and np.all(np.diff(a) > 0) and a.max() < 300
    assert not np.array_equal(a, EvalPlan(limit=40, seed=6).subset(300, 1, 9))
    assert plan.subset(300, 9, 9) is None  # the last round: the full test set
    assert EvalPlan(limit=300).subset(300, 1, 9) is None  # a limit >= the set: all of it
    assert EvalPlan().subset(300, 1, 9) is None


@pytest.mark.parametrize(("kw", "message"), [
    ({"every": 0}, "--eval-every must be an integer >= 1, got 0"),
    ({"every": True}, "--eval-every must be an integer >= 1, got True"),
    ({"limit": 0}, "--eval-limit must be an integer >= 1, got 0"),
    ({"limit": 2.5}, "--eval-limit must be an integer >= 1, got 2.5"),
])
def test_a_bad_plan_is_refused_naming_the_flag(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EvalPlan(**kw)  # type: ignore[arg-type]


def test_evaluation_takes_the_cores_and_gives_the_thread_count_back() -> None:
    before = torch.get_num_threads()
    with all_cores() as inside:
        assert inside >= before
    assert torch.get_num_threads() == before
    with all_cores(threads=1) as capped:  # --server-threads caps it
        assert capped == 1
    assert torch.get_num_threads() == before


def test_a_round_evaluates_its_subset_and_the_last_round_the_full_set() -> None:
    torch.manual_seed(0)
    client, server = nn.Flatten(), nn.Linear(4, 3)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((100, 4)).astype(np.float32), rng.integers(0, 3, 100)
    plan = EvalPlan(every=2, limit=30, seed=1)
    assert evaluate_round(plan, 1, 5, client, server, x, y) is None
    sub = evaluate_round(plan, 2, 5, client, server, x, y)
    idx = plan.subset(100, 2, 5)
    assert sub is not None and idx is not None and sub.samples == 30
    want = evaluate(client, server, x[idx], y[idx])
    # the same batches through the same kernels: equal up to the thread count's summation
    # order in the linear layer (float32, 4 terms: a few ulps of the loss)
    assert sub.accuracy == want.accuracy and sub.loss == pytest.approx(want.loss, rel=1e-5)
    full = evaluate_round(plan, 5, 5, client, server, x, y)
    assert full is not None and full.samples == 100


REC = {"round": 2, "test_accuracy": 0.5, "test_loss": 1.25, "server_train_loss": 0.75,
       "device_local_loss": None, "round_bytes_up": 1000, "round_bytes_down": 2000,
       "round_seconds": 3.0, "seconds_waiting": 2.0, "seconds_training": 0.5,
       "seconds_evaluating": 0.25, "seconds_aggregating": 0.125,
       "device_peak_rss_mb": {"dev-0": 80.0, "dev-1": None}, "device_step_ms": {"dev-0": 4.5}}


def test_a_record_becomes_scalars_and_nulls_are_left_out() -> None:
    s = round_scalars(REC)
    assert s["test/accuracy"] == 0.5 and s["bytes/up"] == 1000.0
    assert s["device/dev-0/peak_rss_mb"] == 80.0 and s["device/dev-0/step_ms_median"] == 4.5
    assert "train/device_local_loss" not in s and "device/dev-1/peak_rss_mb" not in s
    assert "test/accuracy" not in round_scalars({**REC, "test_accuracy": None})


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_event_files_hold_each_rounds_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    log = RoundLog(tmp_path / "tb")
    log.add({**REC, "round": 1, "test_accuracy": None, "test_loss": None})
    log.add(REC)
    log.close()
    got = read_scalars(tmp_path / "tb")
    assert got["test/accuracy"] == [(2, 0.5)]  # round 1 was not evaluated
    # every value here is a float32-exact binary fraction: read back exactly
    assert got["time/aggregating"] == [(1, 0.125), (2, 0.125)]
    assert got["device/dev-0/step_ms_median"] == [(1, 4.5), (2, 4.5)]
