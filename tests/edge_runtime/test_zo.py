"""ZO estimator against torch autograd; seeded reproducibility; optimizers against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_runtime import zo
from edge_runtime.protocol import OptimizerConfig, ZOConfig
from edge_runtime.protocol.config import DISTRIBUTIONS, OPTIMIZERS, SCHEMES

IN, HIDDEN, OUT, N = 8, 16, 4, 64
SHAPES = [(HIDDEN, IN), (HIDDEN,), (OUT, HIDDEN), (OUT,)]
D = sum(int(np.prod(s)) for s in SHAPES)  # 212 parameters


def _data() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, OUT, (N,), generator=gen)
    theta = (torch.randn(D, generator=gen, dtype=torch.float64) * 0.3).numpy().astype(np.float32)
    return x, y, theta


X, Y, THETA = _data()


def _forward(flat: torch.Tensor) -> torch.Tensor:
    """Loss of a 2-layer MLP whose parameters are the flat vector (float64 inside)."""
    w1, b1, w2, b2 = torch.split(flat, [int(np.prod(s)) for s in SHAPES])
    hidden = torch.tanh(torch.addmm(b1, X, w1.view(SHAPES[0]).T))
    return F.cross_entropy(torch.addmm(b2, hidden, w2.view(SHAPES[2]).T), Y)


def loss_fn(theta: np.ndarray) -> float:
    assert theta.dtype == np.float32 and theta.shape == (D,)
    with torch.inference_mode():  # forward only, like the device
        return float(_forward(torch.from_numpy(theta).double()))


def true_grad(theta: np.ndarray) -> np.ndarray:
    flat = torch.from_numpy(theta.astype(np.float64)).requires_grad_(True)
    _forward(flat).backward()
    assert flat.grad is not None
    return flat.grad.numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


GRAD = true_grad(THETA)
LOSS0 = loss_fn(THETA)
CONFIGS = [ZOConfig(scheme=s, distribution=d) for s in SCHEMES for d in DISTRIBUTIONS]
CFG_IDS = [f"{c.scheme}-{c.distribution}" for c in CONFIGS]


def test_true_gradient_is_not_trivial() -> None:
    assert GRAD.shape == (D,) and 150 < D < 300
    assert np.linalg.norm(GRAD) > 1e-2


@pytest.fixture(scope="module", params=CONFIGS, ids=CFG_IDS)
def mean_estimate(request: pytest.FixtureRequest) -> tuple[ZOConfig, np.ndarray]:
    cfg: ZOConfig = request.param
    loss0 = LOSS0 if cfg.scheme == "forward" else None
    grads = [zo.estimate(loss_fn, THETA, s, cfg, loss0).grad for s in range(2000)]
    return cfg, np.mean(np.asarray(grads, dtype=np.float64), axis=0)


def test_averaged_estimate_points_along_the_true_gradient(
        mean_estimate: tuple[ZOConfig, np.ndarray]) -> None:
    _, g = mean_estimate
    assert _cos(g, GRAD) > 0.9


def test_estimate_is_unbiased_in_scale(mean_estimate: tuple[ZOConfig, np.ndarray]) -> None:
    """E[g] = ∇l: the mean's component along ∇ is |∇|, and its norm is close to |∇|."""
    _, g = mean_estimate
    along = float(np.dot(g, GRAD) / np.dot(GRAD, GRAD))
    assert 0.85 < along < 1.15
    assert 0.8 < np.linalg.norm(g) / np.linalg.norm(GRAD) < 1.5


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_projected_value_is_the_directional_derivative(cfg: ZOConfig) -> None:
    """Each direction's finite difference matches ∇l·u from autograd."""
    for step in range(5):
        est = zo.estimate(loss_fn, THETA, step, cfg)
        u = zo.direction(int(est.seeds[0]), D, cfg.distribution).astype(np.float64)
        exact = float(np.dot(GRAD, u))
        tol = 2e-2 if cfg.scheme == "forward" else 2e-3
        assert est.projected[0] == pytest.approx(exact, rel=tol, abs=1e-4 * np.linalg.norm(u))


def test_single_gaussian_estimate_has_the_expected_spread() -> None:
    """|g| of one Gaussian estimate is about |∇·z|·|z|, i.e. ~sqrt(d) times |∇| on average."""
    cfg = ZOConfig()
    norms = [np.linalg.norm(zo.estimate(loss_fn, THETA, s, cfg, LOSS0).grad) for s in range(400)]
    ratio = float(np.mean(norms)) / float(np.linalg.norm(GRAD))
    expected = np.sqrt(2 / np.pi) * np.sqrt(D)  # E|N(0,1)| * E|z|
    assert 0.8 * expected < ratio < 1.2 * expected


def test_loss_reported_matches_the_evaluations() -> None:
    fwd = zo.estimate(loss_fn, THETA, 3, ZOConfig())
    assert fwd.loss == LOSS0
    central = zo.estimate(loss_fn, THETA, 3, ZOConfig(scheme="central"))
    assert central.loss == pytest.approx(LOSS0, abs=1e-4)


def test_forward_uses_given_loss0_and_counts_evaluations() -> None:
    calls: list[np.ndarray] = []

    def counting(theta: np.ndarray) -> float:
        calls.append(theta.copy())
        return loss_fn(theta)

    zo.estimate(counting, THETA, 0, ZOConfig(q=3), loss0=LOSS0)
    assert len(calls) == 3
    calls.clear()
    zo.estimate(counting, THETA, 0, ZOConfig(q=3))
    assert len(calls) == 4 and np.array_equal(calls[0], THETA)
    calls.clear()
    zo.estimate(counting, THETA, 0, ZOConfig(q=3, scheme="central"), loss0=LOSS0)
    assert len(calls) == 6
    assert all(c.dtype == np.float32 for c in calls)


def test_estimate_leaves_theta_untouched() -> None:
    theta = THETA.copy()
    zo.estimate(loss_fn, theta, 1, ZOConfig(q=2, scheme="central"))
    assert np.array_equal(theta, THETA)


# --- reproducibility ------------------------------------------------------------------------

@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_same_seed_same_direction_different_seed_different(dist: str) -> None:
    a, b = zo.direction(12345, D, dist), zo.direction(12345, D, dist)
    assert a.dtype == np.float32 and a.shape == (D,)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, zo.direction(12346, D, dist))
    if dist == "sphere":
        assert np.linalg.norm(a) == pytest.approx(1.0, rel=1e-5)


def test_direction_bits_are_pinned() -> None:
    """PCG64 streams are portable, so these bits must hold on every platform."""
    z = zo.direction(7, 4)
    want = np.random.Generator(np.random.PCG64(7)).standard_normal(4, dtype=np.float32)
    assert np.array_equal(z, want)


def test_direction_seeds_are_distinct_and_reproducible() -> None:
    s = zo.direction_seeds(99, 16)
    assert s.dtype == np.uint64 and len(set(s.tolist())) == 16
    assert np.array_equal(s, zo.direction_seeds(99, 16))
    assert not np.array_equal(s, zo.direction_seeds(100, 16))


@pytest.mark.parametrize("cfg", [*CONFIGS, ZOConfig(q=4), ZOConfig(q=3, scheme="central",
                                                                          distribution="sphere")],
                         ids=[*CFG_IDS, "q4", "q3-central-sphere"])
def test_same_step_seed_reproduces_estimate_and_update_bit_for_bit(cfg: ZOConfig) -> None:
    opt = OptimizerConfig(name="adam", lr=1e-3)
    runs = []
    for _ in range(2):
        est = zo.estimate(loss_fn, THETA, 2024, cfg)
        new, state = zo.apply(THETA, est.grad, zo.init_state(THETA, opt), opt)
        runs.append((est, new, state))
    (e1, n1, s1), (e2, n2, s2) = runs
    assert np.array_equal(e1.grad, e2.grad) and np.array_equal(e1.projected, e2.projected)
    assert np.array_equal(e1.seeds, e2.seeds) and e1.loss == e2.loss
    assert np.array_equal(n1, n2) and np.array_equal(s1.m, s2.m) and np.array_equal(s1.v, s2.v)
    other = zo.estimate(loss_fn, THETA, 2025, cfg)
    assert not np.array_equal(other.grad, e1.grad)
    assert not np.array_equal(other.seeds, e1.seeds)


@pytest.mark.parametrize("cfg", [*CONFIGS, ZOConfig(q=5), ZOConfig(q=2, scheme="central",
                                                                          distribution="sphere")],
                         ids=[*CFG_IDS, "q5", "q2-central-sphere"])
def test_reconstruct_from_the_log_equals_the_estimate_bit_for_bit(cfg: ZOConfig) -> None:
    for step in range(4):
        est = zo.estimate(loss_fn, THETA, step, cfg)
        assert est.seeds.shape == est.projected.shape == (cfg.q,)
        assert est.projected.dtype == np.float32 and est.grad.dtype == np.float32
        rebuilt = zo.reconstruct(est.seeds, est.projected, D, cfg)
        assert np.array_equal(rebuilt, est.grad)


def test_reconstruct_is_the_scaled_mean_of_projected_directions() -> None:
    seeds = np.array([3, 5, 8], dtype=np.uint64)
    p = np.array([0.5, -2.0, 1.25], dtype=np.float32)
    for dist, scale in (("gaussian", 1.0), ("sphere", float(D))):
        cfg = ZOConfig(q=3, distribution=dist)
        want = scale / 3 * sum(float(pi) * zo.direction(int(s), D, dist).astype(np.float64)
                               for s, pi in zip(seeds, p, strict=True))
        np.testing.assert_allclose(zo.reconstruct(seeds, p, D, cfg), want, rtol=1e-5,
                                   atol=1e-6 * scale)


# --- optimizers -----------------------------------------------------------------------------

def _grads(k: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.standard_normal(D).astype(np.float32) * (i + 1) for i in range(k)]


def test_sgd_is_theta_minus_lr_g_and_leaves_inputs_untouched() -> None:
    cfg = OptimizerConfig(name="sgd", lr=0.05)
    theta, g = THETA.copy(), _grads(1)[0]
    g_before = g.copy()
    state = zo.init_state(theta, cfg)
    new, state2 = zo.apply(theta, g, state, cfg)
    assert new.dtype == np.float32 and new.shape == (D,)
    np.testing.assert_allclose(new, THETA.astype(np.float64) - 0.05 * g.astype(np.float64),
                               rtol=1e-6, atol=1e-7)
    assert np.array_equal(new, THETA - np.float32(0.05) * g)
    assert np.array_equal(theta, THETA) and np.array_equal(g, g_before)
    assert state.step == 0 and state2.step == 1


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_matches_torch(name: str, weight_decay: float) -> None:
    cfg = OptimizerConfig(name=name, lr=1e-2, weight_decay=weight_decay)
    param = torch.nn.Parameter(torch.from_numpy(THETA.copy()))
    opt: torch.optim.Optimizer = (
        torch.optim.Adam([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                         weight_decay=weight_decay) if name == "adam"
        else torch.optim.SGD([param], lr=1e-2, weight_decay=weight_decay))
    theta, state = THETA.copy(), zo.init_state(THETA, cfg)
    for g in _grads(6):
        theta, state = zo.apply(theta, g, state, cfg)
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        np.testing.assert_allclose(theta, param.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert state.step == 6
    assert not np.allclose(theta, THETA)


def test_adam_state_starts_at_zero_and_sgd_has_none() -> None:
    s = zo.init_state(THETA, OptimizerConfig(name="adam"))
    assert s.step == 0 and s.m is not None and s.v is not None
    assert not s.m.any() and not s.v.any() and s.m.shape == (D,)
    s2 = zo.init_state(THETA, OptimizerConfig(name="sgd"))
    assert s2.m is None and s2.v is None


# --- config validation ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"mu": 0.0}, {"mu": -1e-3}, {"mu": float("nan")}, {"mu": float("inf")},
    {"q": 0}, {"q": -2},
    {"scheme": "backward"}, {"scheme": ""},
    {"distribution": "uniform"}, {"distribution": "Gaussian"},
], ids=str)
def test_bad_zo_config_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ZOConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    {"name": "rmsprop"}, {"name": "Adam"}, {"lr": 0.0}, {"lr": -0.1}, {"lr": float("nan")},
    {"lr": float("inf")},
], ids=str)
def test_bad_optimizer_config_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        OptimizerConfig(**kwargs)  # type: ignore[arg-type]


def test_good_configs_are_accepted() -> None:
    assert ZOConfig(mu=1e-5, q=8, scheme="central", distribution="sphere").q == 8
    assert OptimizerConfig(name="adam", lr=1e-4).name == "adam"
