"""Round planning and FedAvg: pure functions checked against hand computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from server.aggregate import (
    DeviceUpdate,
    aggregate,
    check_update,
    clip_update,
    plan_round,
    trimmed_count,
)

# --- aggregate ------------------------------------------------------------------------------

A = np.array([1.0, -2.0, 4.0], np.float32)
B = np.array([3.0, 2.0, 0.0], np.float32)
C = np.array([0.5, 0.5, 0.5], np.float32)


def _u(dev: str, w: np.ndarray, n: int) -> DeviceUpdate:
    return DeviceUpdate(dev, w, n)


def test_sample_weighted_average_by_hand() -> None:
    out = aggregate([_u("a", A, 1), _u("b", B, 3)], "samples")
    # (1*A + 3*B) / 4 = ([1,-2,4] + [9,6,0]) / 4
    np.testing.assert_allclose(out, [10 / 4, 4 / 4, 4 / 4], rtol=1e-7)
    assert out.dtype == np.float32 and out.shape == (3,)


def test_sample_weighting_is_the_default() -> None:
    ups = [_u("a", A, 10), _u("b", B, 30), _u("c", C, 60)]
    np.testing.assert_array_equal(aggregate(ups), aggregate(ups, "samples"))
    np.testing.assert_allclose(aggregate(ups), 0.1 * A + 0.3 * B + 0.6 * C, rtol=1e-6)


def test_uniform_average_ignores_sample_counts() -> None:
    out = aggregate([_u("a", A, 1), _u("b", B, 1000), _u("c", C, 0)], "uniform")
    np.testing.assert_allclose(out, [(1 + 3 + 0.5) / 3, (-2 + 2 + 0.5) / 3, (4 + 0 + 0.5) / 3],
                               rtol=1e-6)


def test_equal_counts_make_both_weightings_agree() -> None:
    ups = [_u("a", A, 7), _u("b", B, 7), _u("c", C, 7)]
    np.testing.assert_allclose(aggregate(ups, "samples"), aggregate(ups, "uniform"), rtol=1e-7)


def test_single_update_is_returned_unchanged() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(1000).astype(np.float32)
    for weighting in ("samples", "uniform"):
        np.testing.assert_array_equal(aggregate([_u("a", w, 5)], weighting), w)


def test_average_is_accumulated_in_float64() -> None:
    """Many large, nearly equal vectors average without float32 drift."""
    base = np.full(4, 1e4, np.float32)
    ups = [_u(f"d{i}", base + np.float32(i % 2), 1) for i in range(1001)]
    np.testing.assert_allclose(aggregate(ups, "uniform"), 1e4 + 500 / 1001, rtol=1e-7)


def test_inputs_are_not_modified() -> None:
    a, b = A.copy(), B.copy()
    aggregate([_u("a", a, 2), _u("b", b, 1)])
    assert np.array_equal(a, A) and np.array_equal(b, B)


def test_aggregate_rejects_empty_and_bad_weighting() -> None:
    with pytest.raises(ValueError, match="zero updates"):
        aggregate([])
    with pytest.raises(ValueError, match="weighting"):
        aggregate([_u("a", A, 1)], "median")


@pytest.mark.parametrize("counts", [[0, 1], [1, -3], [0, 0]])
def test_sample_weighting_needs_positive_counts(counts: list[int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        aggregate([_u("a", A, counts[0]), _u("b", B, counts[1])], "samples")


def test_aggregate_refuses_updates_of_different_shapes() -> None:
    for other in (np.array([5.0], np.float32), np.zeros((3, 1), np.float32)):
        for pair in ([_u("a", A, 1), _u("b", other, 1)], [_u("b", other, 1), _u("a", A, 1)]):
            with pytest.raises(ValueError, match="shape"):
                aggregate(pair)


# --- robust aggregation: checked against numpy's median and scipy's trimmed mean -----------

def _stack(n: int, d: int = 257, seed: int = 0) -> list[DeviceUpdate]:
    rng = np.random.default_rng(seed)
    return [_u(f"d{i}", rng.standard_normal(d).astype(np.float32), int(rng.integers(1, 99)))
            for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_median_is_numpys_coordinate_wise_median(n: int) -> None:
    ups = _stack(n)
    want = np.median(np.stack([u.weights for u in ups]).astype(np.float64), axis=0)
    out = aggregate(ups, method="median")
    assert out.dtype == np.float32 and out.shape == (257,)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("n", "trim"), [(1, 0.2), (3, 0.2), (3, 0.34), (5, 0.2), (5, 0.4),
                                         (8, 0.1), (8, 0.25), (10, 0.0)])
def test_trimmed_mean_is_scipys_trim_mean(n: int, trim: float) -> None:
    ups = _stack(n, seed=n)
    want = stats.trim_mean(np.stack([u.weights for u in ups]).astype(np.float64), trim, axis=0)
    np.testing.assert_allclose(aggregate(ups, method="trimmed-mean", trim=trim), want,
                               rtol=1e-6, atol=1e-7)


def test_trimmed_count_rounds_down_like_scipy() -> None:
    assert [trimmed_count(n, 0.2) for n in (1, 3, 4, 5, 9, 10)] == [0, 0, 0, 1, 1, 2]
    assert trimmed_count(3, 0.34) == 1
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="--trim"):
            trimmed_count(5, bad)


def test_robust_aggregates_ignore_sample_counts() -> None:
    ups = _stack(5)
    louder = [_u(u.device_id, u.weights, 10**9 if i == 0 else 1) for i, u in enumerate(ups)]
    for method in ("median", "trimmed-mean"):
        np.testing.assert_array_equal(aggregate(ups, method=method),
                                      aggregate(louder, method=method))


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_one_hostile_update_moves_robust_aggregates_by_a_bounded_amount(method: str) -> None:
    """The mean follows an update of 1e6 anywhere; median and trimmed mean (one trimmed at
    each end of 5) stay inside the honest updates' range in every coordinate."""
    honest = _stack(4)
    hostile = _u("evil", np.full(257, 1e6, np.float32), 1)
    lo = np.min([u.weights for u in honest], axis=0)
    hi = np.max([u.weights for u in honest], axis=0)
    out = aggregate([*honest, hostile], method=method, trim=0.2)
    assert np.all(out >= lo) and np.all(out <= hi)
    assert float(aggregate([*honest, hostile], "uniform").max()) > 1e5


def test_unknown_aggregate_is_refused() -> None:
    with pytest.raises(ValueError, match="aggregate must be one of"):
        aggregate([_u("a", A, 1)], method="krum")


def test_clip_update_pulls_a_far_update_back_to_the_bound() -> None:
    ref = np.array([1.0, 1.0, 1.0], np.float32)
    far = ref + np.array([3.0, 4.0, 0.0], np.float32)  # 5 away
    out, norm = clip_update(far, ref, 2.5)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(out, ref + np.array([1.5, 2.0, 0.0]), rtol=1e-6)
    assert out.dtype == np.float32
    near, norm = clip_update(far, ref, 5.5)  # within the bound: returned as is
    assert near is far and norm == pytest.approx(5.0)
    with pytest.raises(ValueError, match="> 0"):
        clip_update(far, ref, 0.0)


# --- check_update ---------------------------------------------------------------------------

def test_good_update_passes() -> None:
    assert check_update(A, 3) is None
    assert check_update(np.zeros(0, np.float32), 0) is None
    assert check_update(A * 1e6, 3) is None  # size alone is no reason to refuse


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_refused(bad: float) -> None:
    w = A.copy()
    w[1] = bad
    why = check_update(w, 3)
    assert why is not None and "NaN or Inf" in why


@pytest.mark.parametrize("w", [np.zeros(4, np.float32), np.zeros(2, np.float32),
                               np.zeros((3, 1), np.float32), np.zeros((1, 3), np.float32),
                               np.float32(1.0) * np.ones(()), np.zeros(0, np.float32)],
                         ids=["too-long", "too-short", "column", "row", "scalar", "empty"])
def test_wrong_shape_is_refused(w: np.ndarray) -> None:
    why = check_update(w.astype(np.float32), 3)
    assert why is not None and "shape" in why


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.uint8, np.bool_])
def test_wrong_dtype_is_refused(dtype: type) -> None:
    why = check_update(A.astype(dtype), 3)
    assert why is not None and "dtype" in why


# --- plan_round -----------------------------------------------------------------------------

POOL = [f"dev-{i}" for i in range(10)]


def test_all_ready_devices_train_by_default() -> None:
    assert plan_round(["dev-2", "dev-0", "dev-1"], None, 0, 0) == ("dev-0", "dev-1", "dev-2")
    assert plan_round(POOL, len(POOL), 3, 0) == tuple(sorted(POOL))
    assert plan_round(POOL, 50, 3, 0) == tuple(sorted(POOL))


def test_empty_pool_gives_an_empty_round() -> None:
    assert plan_round([], None, 0, 0) == ()
    assert plan_round([], 3, 0, 0) == ()


@pytest.mark.parametrize("per_round", [1, 3, 9])
def test_seeded_subset_has_the_size_and_is_deterministic(per_round: int) -> None:
    for r in range(20):
        chosen = plan_round(POOL, per_round, r, seed=42)
        assert len(chosen) == per_round == len(set(chosen))
        assert set(chosen) <= set(POOL)
        assert list(chosen) == sorted(chosen)
        assert plan_round(POOL, per_round, r, seed=42) == chosen
        assert plan_round(list(reversed(POOL)), per_round, r, seed=42) == chosen


def test_subset_changes_with_round_and_seed_and_covers_everyone() -> None:
    by_round = {plan_round(POOL, 3, r, seed=7) for r in range(30)}
    assert len(by_round) > 10
    assert set().union(*by_round) == set(POOL)
    by_seed = {plan_round(POOL, 3, 0, seed=s) for s in range(30)}
    assert len(by_seed) > 10


@pytest.mark.parametrize("per_round", [0, -1])
def test_non_positive_round_size_is_refused(per_round: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        plan_round(POOL, per_round, 0, 0)
