"""Guided ZO directions (issue 15): the basis checks, the span, the mean, and the payoff."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime import zo, zo_guided
from edge_runtime.protocol import OptimizerConfig, ZOConfig

D, K = 1000, 8


def _basis(d: int = D, k: int = K, seed: int = 0) -> np.ndarray:
    return zo_guided.orthonormal_basis(np.random.default_rng(seed).standard_normal((d, 3 * k)), k)


def _quadratic(v: np.ndarray, target: np.ndarray):  # noqa: ANN202 - a test helper
    """f(θ) = ½‖Vᵀ(θ - θ*)‖²: its gradient V Vᵀ(θ - θ*) lies in span(V)."""
    def f(theta: np.ndarray) -> float:
        r = v.T.astype(np.float64) @ (theta.astype(np.float64) - target)
        return 0.5 * float(r @ r)
    return f


def test_orthonormal_basis_spans_the_top_singular_directions() -> None:
    rng = np.random.default_rng(1)
    signal = zo_guided.orthonormal_basis(rng.standard_normal((D, K)), K)  # the true subspace
    grads = signal @ (10.0 * rng.standard_normal((K, 40))) + 0.01 * rng.standard_normal((D, 40))
    u = zo_guided.check_basis(zo_guided.orthonormal_basis(grads, K), D)
    assert u.shape == (D, K) and u.dtype == np.float32
    assert np.abs(u.T @ u - np.eye(K)).max() < 1e-5
    # the span is recovered: every true direction is (almost) inside span(U)
    assert np.linalg.norm(u.T @ signal, axis=0).min() > 0.999


def test_orthonormal_basis_is_padded_when_the_gradients_have_lower_rank() -> None:
    grads = np.outer(np.arange(1.0, D + 1), np.ones(5))  # rank 1
    u = zo_guided.check_basis(zo_guided.orthonormal_basis(grads, 4), D)
    first = grads[:, 0] / np.linalg.norm(grads[:, 0])
    assert abs(float(u[:, 0] @ first)) > 0.9999


@pytest.mark.parametrize(("basis", "match"), [
    (np.ones(D, np.float32), "shape"),
    (np.ones((3, 5), np.float32), "shape"),
    (np.eye(D, K, dtype=np.int64), "dtype"),
    (np.where(np.eye(D, K) > 0, np.nan, 0.0), "NaN"),
    (2 * np.eye(D, K), "not orthonormal"),
    (np.ones((D, K)) / np.sqrt(D), "not orthonormal"),
])
def test_bad_basis_is_rejected_with_the_reason(basis: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        zo_guided.check_basis(basis)


def test_basis_for_another_model_and_fp16_wire_copy() -> None:
    u = _basis()
    with pytest.raises(ValueError, match="rows but the model has"):
        zo_guided.check_basis(u, D + 1)
    back = zo_guided.check_basis(u.astype(np.float16), D)  # what the device receives
    assert back.dtype == np.float32 and np.abs(back - u).max() < 1e-3


def test_guided_update_lies_in_span_of_the_basis() -> None:
    u = _basis()
    f = _quadratic(_basis(seed=5), np.ones(D))
    theta = np.zeros(D, np.float32)
    est = zo_guided.estimate_guided(f, theta, 7, u, ZOConfig(q=3))
    assert np.linalg.norm(est.grad) > 0
    outside = est.grad - u @ (u.T @ est.grad)
    assert np.linalg.norm(outside) < 1e-5 * np.linalg.norm(est.grad)
    new, _ = zo.apply(theta, est.grad, zo.init_state(theta, OptimizerConfig(name="sgd")),
                      OptimizerConfig(name="sgd", lr=0.1))
    step = new - theta
    assert np.linalg.norm(step - u @ (u.T @ step)) < 1e-5 * np.linalg.norm(step)


def test_isotropic_part_is_exactly_the_stated_one() -> None:
    """α > 0: outside span(U) the update is sqrt(αk/d)·ε, ε the seed's second draw."""
    u, alpha = _basis(), 0.1
    f = _quadratic(u, np.ones(D))
    est = zo_guided.estimate_guided(f, np.zeros(D, np.float32), 3, u, ZOConfig(q=2), alpha)
    expected = np.zeros(D)
    for seed, p in zip(est.seeds, est.projected, strict=True):
        gen = np.random.Generator(np.random.PCG64(int(seed)))
        z = gen.standard_normal(K, dtype=np.float32)
        eps = gen.standard_normal(D, dtype=np.float32)
        expected += p * (np.sqrt(1 - alpha) * (u @ z) + np.sqrt(alpha * K / D) * eps) / 2
    assert np.allclose(est.grad, expected, atol=1e-5)
    iso = est.grad - u @ (u.T @ est.grad)
    assert np.linalg.norm(iso) > 0.1 * np.linalg.norm(est.grad)  # it is really there


def test_guided_estimate_is_unbiased_for_the_projected_gradient() -> None:
    u = _basis()
    target = np.random.default_rng(2).standard_normal(D)
    f = _quadratic(np.eye(D, 40), target)  # gradient outside span(U) too
    theta = np.zeros(D, np.float32)
    grad = -(np.eye(D, 40) @ np.eye(D, 40).T @ target)
    mean = np.mean([zo_guided.estimate_guided(f, theta, s, u, ZOConfig(mu=1e-4)).grad
                    for s in range(1500)], axis=0)
    projected = u @ (u.T @ grad)
    assert np.linalg.norm(mean - projected) < 0.2 * np.linalg.norm(projected)


def test_same_seed_reproduces_and_the_log_rebuilds_the_estimate() -> None:
    u = _basis()
    f = _quadratic(u, np.ones(D))
    theta = np.zeros(D, np.float32)
    for alpha in (0.0, 0.2):
        a = zo_guided.estimate_guided(f, theta, 11, u, ZOConfig(q=2), alpha)
        b = zo_guided.estimate_guided(f, theta, 11, u, ZOConfig(q=2), alpha)
        assert np.array_equal(a.grad, b.grad)
        assert np.array_equal(zo_guided.reconstruct_guided(a.seeds, a.projected, u, alpha), a.grad)
    with pytest.raises(ValueError, match="alpha"):
        zo_guided.guided_direction(1, u, 1.0)
    with pytest.raises(ValueError, match="rows"):
        zo_guided.estimate_guided(f, np.zeros(D + 1, np.float32), 1, u, ZOConfig())


def _steps_to_solve(f, theta0: np.ndarray, step, lr: float, tol: float,  # noqa: ANN001
                    limit: int) -> int:
    theta, f0 = theta0.copy(), f(theta0)
    for t in range(1, limit + 1):
        est = step(f, theta, t)
        theta = (theta - np.float32(lr) * est.grad).astype(np.float32)
        if f(theta) <= tol * f0:
            return t
    return limit + 1


def test_guided_solves_a_low_rank_quadratic_20x_faster_at_equal_forwards() -> None:
    """Both use q=1 forward differences (2 forwards per step), each at its stable SGD step
    1/(n+2) for its n-dimensional directions (d for random, k for guided)."""
    v = _basis(seed=3)  # the gradient's known subspace, what a good guide would send
    target = np.random.default_rng(4).standard_normal(D).astype(np.float32)
    f = _quadratic(v, target)
    theta0 = np.zeros(D, np.float32)
    cfg = ZOConfig(mu=1e-4)
    guided = _steps_to_solve(
        f, theta0, lambda f, th, t: zo_guided.estimate_guided(f, th, t, v, cfg),
        1.0 / (K + 2), 1e-2, 100_000)
    limit = 40 * guided
    random = _steps_to_solve(f, theta0, lambda f, th, t: zo.estimate(f, th, t, cfg),
                             1.0 / (D + 2), 1e-2, limit)
    assert guided < 200
    assert random >= 20 * guided, (guided, random)
