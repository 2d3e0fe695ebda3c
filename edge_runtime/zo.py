"""Zeroth-order gradient estimation and the optimizers fed by it: pure functions.

Everything works on one flat float32 parameter vector. A direction is never stored: it is
regenerated from an integer seed with numpy's PCG64, which is portable across platforms,
so the round's (seed, projected gradient) log describes every update exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SCHEMES = ("forward", "central")
DISTRIBUTIONS = ("gaussian", "sphere")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class ZOConfig:
    mu: float = 1e-3  # smoothing: perturbation size
    q: int = 1  # directions per step
    scheme: str = "forward"  # forward: [l(θ+μu) - l(θ)]/μ; central: [l(θ+μu) - l(θ-μu)]/2μ
    distribution: str = "gaussian"  # gaussian z ~ N(0, I); sphere u = z/|z| (scaled by d)

    def __post_init__(self) -> None:
        if not (self.mu > 0 and np.isfinite(self.mu)):
            raise ValueError(f"mu must be a positive number, got {self.mu}")
        if self.q < 1:
            raise ValueError(f"q (directions per step) must be >= 1, got {self.q}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, "
                             f"got {self.distribution!r}")


@dataclass(frozen=True)
class ZOEstimate:
    grad: np.ndarray  # the estimate g, same shape as θ
    projected: np.ndarray  # one scalar per direction: the finite difference along it
    seeds: np.ndarray  # uint64 seed of each direction
    loss: float  # l(θ) for forward differences, else the mean of the two evaluations


def direction_seeds(step_seed: int, q: int) -> np.ndarray:
    """q independent direction seeds derived from the step's seed."""
    return np.random.SeedSequence([int(step_seed)]).generate_state(q, dtype=np.uint64)


def direction(seed: int, d: int, distribution: str = "gaussian") -> np.ndarray:
    """The perturbation for `seed`: identical bits on every platform for the same inputs."""
    z = np.random.Generator(np.random.PCG64(int(seed))).standard_normal(d, dtype=np.float32)
    if distribution == "sphere":
        z /= np.linalg.norm(z)
    return z


def _scale(d: int, cfg: ZOConfig) -> float:
    # E[u u^T] = I for Gaussian u but I/d on the unit sphere, hence the paper's factor d.
    return float(d) if cfg.distribution == "sphere" else 1.0


def estimate(
    loss_fn: Callable[[np.ndarray], float],
    theta: np.ndarray,
    step_seed: int,
    cfg: ZOConfig,
    loss0: float | None = None,
) -> ZOEstimate:
    """Two-point estimate of ∇l(θ) from forward evaluations only.

    `loss0` is l(θ) when the caller already has it (the device's unperturbed pass also
    yields the smashed data), saving one forward pass per step.
    """
    d = theta.size
    seeds = direction_seeds(step_seed, cfg.q)
    projected = np.empty(cfg.q, dtype=np.float64)
    if cfg.scheme == "forward" and loss0 is None:
        loss0 = float(loss_fn(theta))
    losses = []
    for i, seed in enumerate(seeds):
        u = direction(int(seed), d, cfg.distribution)
        plus = float(loss_fn(theta + np.float32(cfg.mu) * u))
        if cfg.scheme == "forward":
            projected[i] = (plus - loss0) / cfg.mu
            losses.append(loss0)
        else:
            minus = float(loss_fn(theta - np.float32(cfg.mu) * u))
            projected[i] = (plus - minus) / (2 * cfg.mu)
            losses.append(0.5 * (plus + minus))
    grad = reconstruct(seeds, projected.astype(np.float32), d, cfg)
    return ZOEstimate(grad, projected.astype(np.float32), seeds, float(np.mean(losses)))


def reconstruct(seeds: np.ndarray, projected: np.ndarray, d: int, cfg: ZOConfig) -> np.ndarray:
    """g = scale/q · Σ p_i u_i, rebuilt from the log alone (what a server could replay)."""
    grad = np.zeros(d, dtype=np.float32)
    for seed, p in zip(seeds, projected, strict=True):
        grad += np.float32(p) * direction(int(seed), d, cfg.distribution)
    grad *= np.float32(_scale(d, cfg) / len(seeds))
    return grad


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive, got {self.lr}")


@dataclass(frozen=True)
class OptimizerState:
    step: int
    m: np.ndarray | None = None
    v: np.ndarray | None = None


def init_state(theta: np.ndarray, cfg: OptimizerConfig) -> OptimizerState:
    if cfg.name == "adam":
        return OptimizerState(0, np.zeros_like(theta), np.zeros_like(theta))
    return OptimizerState(0)


def apply(theta: np.ndarray, grad: np.ndarray, state: OptimizerState,
          cfg: OptimizerConfig) -> tuple[np.ndarray, OptimizerState]:
    """One optimizer step; returns new arrays and leaves the inputs untouched."""
    if cfg.weight_decay:
        grad = grad + np.float32(cfg.weight_decay) * theta
    t = state.step + 1
    if cfg.name == "sgd":
        return (theta - np.float32(cfg.lr) * grad).astype(np.float32), OptimizerState(t)
    assert state.m is not None and state.v is not None
    m = cfg.beta1 * state.m + (1 - cfg.beta1) * grad
    v = cfg.beta2 * state.v + (1 - cfg.beta2) * grad * grad
    m_hat = m / (1 - cfg.beta1 ** t)
    v_hat = v / (1 - cfg.beta2 ** t)
    new = theta - cfg.lr * m_hat / (np.sqrt(v_hat) + cfg.eps)
    return new.astype(np.float32), OptimizerState(t, m.astype(np.float32),
                                                   v.astype(np.float32))
