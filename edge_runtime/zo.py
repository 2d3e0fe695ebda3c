"""Zeroth-order gradient estimation and the optimizers fed by it: pure functions.

Everything works on one flat float32 parameter vector. A direction is never stored: it is
regenerated from an integer seed with numpy's PCG64, which is portable across platforms,
so the round's (seed, projected gradient) log describes every update exactly.

Block-wise perturbation (``perturb="block"``): each direction lives in one block (a
contiguous slice of θ, one bundle segment) instead of all of θ. The device then re-runs the
network only from that block on (`edge_runtime.blockzo`). The block is a hash of the
direction's seed, so the (seed, projected) log plus the blocks' (offset, size) still
describe every update. Block j is drawn with probability p_j = d_j / d (the block holding a
uniformly drawn coordinate) and its estimate is weighted by 1/p_j. That keeps the estimate
unbiased, and with Gaussian directions its second moment is Σ_j (d/d_j)(d_j+2)‖∇_j‖², i.e.
the full estimate's (d+2)‖∇‖² when the gradient is spread evenly over coordinates: the same
μ, learning rate and optimizer settings apply in both modes. (Uniform p_j = 1/J would
re-run less on average but inflate the variance of the big blocks J·d_j/d-fold.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

SCHEMES = ("forward", "central")
DISTRIBUTIONS = ("gaussian", "sphere")
OPTIMIZERS = ("sgd", "adam")
PERTURBS = ("full", "block")
_BLOCK_KEY = 0x626C6F636B  # "block": separates the block draw from the direction's stream


@dataclass(frozen=True)
class ZOConfig:
    mu: float = 1e-3  # smoothing: perturbation size
    q: int = 1  # directions per step
    scheme: str = "forward"  # forward: [l(θ+μu) - l(θ)]/μ; central: [l(θ+μu) - l(θ-μu)]/2μ
    distribution: str = "gaussian"  # gaussian z ~ N(0, I); sphere u = z/|z| (scaled by d)
    perturb: str = "full"  # full: directions over all of θ; block: over one block each

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
        if self.perturb not in PERTURBS:
            raise ValueError(f"perturb must be one of {PERTURBS}, got {self.perturb!r}")


@dataclass(frozen=True)
class ZOEstimate:
    grad: np.ndarray  # the estimate g, same shape as θ
    projected: np.ndarray  # one scalar per direction: the finite difference along it
    seeds: np.ndarray  # uint64 seed of each direction
    loss: float  # l(θ) for forward differences, else the mean of the two evaluations
    blocks: np.ndarray = field(  # block of each direction (perturb="block"), else empty
        default_factory=lambda: np.zeros(0, dtype=np.int64))


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
    if cfg.perturb != "full":
        raise ValueError("zo.estimate perturbs all of θ; block-wise estimates come from "
                         "zo.estimate_blocks")
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


def block_of(seed: int, sizes: Sequence[int]) -> int:
    """The block a direction seed perturbs: the one holding a uniformly drawn coordinate
    (probability d_j / d). A hash of the seed, identical on every platform."""
    total = int(sum(sizes))
    if total <= 0:
        raise ValueError("block-wise ZO needs at least one block with parameters")
    word = np.random.SeedSequence([int(seed), _BLOCK_KEY]).generate_state(1, np.uint64)[0]
    coordinate = int(word) % total  # modulo bias < total / 2**64: nil
    return int(np.searchsorted(np.cumsum(sizes), coordinate, side="right"))


def step_blocks(step_seed: int, q: int, sizes: Sequence[int]) -> np.ndarray:
    """The block of each of a step's q directions (known before any evaluation)."""
    return np.asarray([block_of(int(s), sizes) for s in direction_seeds(step_seed, q)],
                      dtype=np.int64)


def estimate_blocks(
    loss_from: Callable[[int, np.ndarray], float],
    theta: np.ndarray,
    blocks: Sequence[tuple[int, int]],
    step_seed: int,
    cfg: ZOConfig,
    loss0: float | None = None,
) -> ZOEstimate:
    """Block-wise two-point estimate: each direction perturbs one block of θ only.

    `blocks` are (offset, size) slices tiling θ; `loss_from(j, values)` is l(θ) with block
    j's slice replaced by `values` (the caller re-runs the network from block j on).
    `loss0` = l(θ), required for forward differences.
    """
    if cfg.perturb != "block":
        raise ValueError("zo.estimate_blocks needs a ZOConfig with perturb='block'")
    sizes = [size for _, size in blocks]
    if sum(sizes) != theta.size:
        raise ValueError(f"blocks cover {sum(sizes)} of the {theta.size} parameters")
    seeds = direction_seeds(step_seed, cfg.q)
    chosen = np.asarray([block_of(int(s), sizes) for s in seeds], dtype=np.int64)
    if cfg.scheme == "forward" and loss0 is None:
        raise ValueError("forward differences need loss0 = l(θ) from the unperturbed pass")
    mu = np.float32(cfg.mu)
    projected = np.empty(cfg.q, dtype=np.float64)
    losses = []
    for i, (seed, j) in enumerate(zip(seeds, chosen, strict=True)):
        offset, size = blocks[j]
        base = theta[offset:offset + size]
        u = direction(int(seed), size, cfg.distribution)
        plus = float(loss_from(int(j), base + mu * u))
        if cfg.scheme == "forward":
            assert loss0 is not None
            projected[i] = (plus - loss0) / cfg.mu
            losses.append(loss0)
        else:
            minus = float(loss_from(int(j), base - mu * u))
            projected[i] = (plus - minus) / (2 * cfg.mu)
            losses.append(0.5 * (plus + minus))
    grad = reconstruct(seeds, projected.astype(np.float32), theta.size, cfg, blocks)
    return ZOEstimate(grad, projected.astype(np.float32), seeds, float(np.mean(losses)),
                      chosen)


def reconstruct(seeds: np.ndarray, projected: np.ndarray, d: int, cfg: ZOConfig,
                blocks: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """g = scale/q · Σ p_i u_i, rebuilt from the log alone (what a server could replay).

    Block-wise: u_i lives in block j = block_of(seed_i) only and carries the block's own
    scale times the importance weight d / d_j; `blocks` are the (offset, size) slices.
    """
    grad = np.zeros(d, dtype=np.float32)
    if cfg.perturb == "block":
        if blocks is None:
            raise ValueError("block-wise estimates are rebuilt with the blocks' (offset, size); "
                             "help: pass the bundle manifest's segments")
        sizes = [size for _, size in blocks]
        for seed, p in zip(seeds, projected, strict=True):
            offset, size = blocks[block_of(int(seed), sizes)]
            weight = np.float32(p) * np.float32(_scale(size, cfg) * d / size)
            grad[offset:offset + size] += weight * direction(int(seed), size, cfg.distribution)
        grad *= np.float32(1.0 / len(seeds))
        return grad
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
