"""Guided zeroth-order directions: perturbations drawn in a server-sent basis, pure functions.

The server sends an orthonormal basis U (d×k) of the directions its own gradients on a
guide set span; the device draws u = sqrt(1-α)·U z + sqrt(α·k/d)·ε, z ~ N(0, I_k),
ε ~ N(0, I_d) (Guided ES's covariance α/d·I + (1-α)/k·UUᵀ scaled by k, so ‖u‖² ≈ k). The
two-point estimate g = s·u with s = [l(θ+μu) - l(θ)]/μ has E[g] = (1-α)·UUᵀ∇l + α·(k/d)·∇l
and E‖g‖² ≈ (k+2)‖UUᵀ∇l‖² (α = 0): the step size that is stable for isotropic ZO in d
dimensions, lr_FO/(d+2), becomes lr_FO/(k+2). With α = 0 every update lies in span(U).

The seeds, the two-point finite differences and the `ZOEstimate` they fill are the
isotropic estimator's (`edge_runtime.zo`); only the direction a seed stands for differs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_runtime.protocol.config import ZOConfig
from edge_runtime.zo import ZOEstimate, direction_seeds

# isotropic (the paper, `zo`), in a server-sent basis, or in the span of each weight's
# inputs (`zo_activation`; raced by baselines.act_race, not yet in the federation)
DIRECTIONS = ("random", "guided", "activation")
BASIS_TOL = 1e-2  # largest |UᵀU - I| entry a guided basis may have (fp16 on the wire)


def check_basis(basis: np.ndarray, d: int | None = None, tol: float = BASIS_TOL) -> np.ndarray:
    """`basis` as a float32 (d, k) array with orthonormal columns, or a ValueError that
    names what is wrong (shape, dtype, non-finite entries, not orthonormal)."""
    arr = np.asarray(basis)
    if arr.ndim != 2 or arr.shape[1] < 1 or arr.shape[0] < arr.shape[1]:
        raise ValueError(f"a guided basis is a (d, k) matrix with 1 <= k <= d, got shape "
                         f"{arr.shape}")
    if d is not None and arr.shape[0] != d:
        raise ValueError(f"the guided basis has {arr.shape[0]} rows but the model has {d} "
                         "parameters; help: the server builds it from this bundle's manifest")
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"a guided basis holds floats, got dtype {arr.dtype}")
    out = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(out)):
        raise ValueError("the guided basis contains NaN or Inf")
    gram = out.T.astype(np.float64) @ out.astype(np.float64)
    err = float(np.abs(gram - np.eye(out.shape[1])).max())
    if err > tol:
        raise ValueError(f"the guided basis is not orthonormal (max |UᵀU - I| = {err:.3g} > "
                         f"{tol:g}); help: build it with zo_guided.orthonormal_basis")
    return out


def orthonormal_basis(grads: np.ndarray, k: int) -> np.ndarray:
    """The top-k left singular vectors of the (d, m) matrix of guide gradients, float32.

    Uncentered on purpose: the guide set's mean gradient is the direction that matters
    most, and it is what the first singular vector mostly is. Computed from the m×m Gram
    matrix (m ≪ d), then re-orthonormalised by QR. Directions with no energy (rank of
    `grads` below k) are filled by QR from a fixed Gaussian, so the result is always (d, k).
    """
    g = np.asarray(grads, dtype=np.float64)
    if g.ndim != 2 or not 1 <= k <= g.shape[0]:
        raise ValueError(f"need a (d, m) gradient matrix and 1 <= k <= d, got {g.shape}, k={k}")
    evals, evecs = np.linalg.eigh(g.T @ g)
    order = np.argsort(evals)[::-1]
    keep = [i for i in order[:k] if evals[i] > 1e-12 * max(float(evals.max()), 1e-300)]
    cols = g @ evecs[:, keep] / np.sqrt(evals[keep]) if keep else np.zeros((g.shape[0], 0))
    if cols.shape[1] < k:  # pad with random directions, orthogonalised against the rest
        fill = np.random.default_rng(0).standard_normal((g.shape[0], k - cols.shape[1]))
        cols = np.concatenate([cols, fill], axis=1)
    q, r = np.linalg.qr(cols)
    q *= np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))  # keep each column's sign
    return q.astype(np.float32)


def guided_direction(seed: int, basis: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """u = sqrt(1-α)·U z + sqrt(α·k/d)·ε for `seed` (module doc), float32 (d,).

    z (k values) and then ε (d values, only when α > 0) come from one PCG64 stream, so
    the same (seed, U, α) gives the same bits everywhere."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"the isotropic share alpha must be in [0, 1), got {alpha}")
    d, k = basis.shape
    gen = np.random.Generator(np.random.PCG64(int(seed)))
    z = gen.standard_normal(k, dtype=np.float32)
    u = basis @ (z * np.float32(np.sqrt(1.0 - alpha)))
    if alpha > 0:
        u += np.float32(np.sqrt(alpha * k / d)) * gen.standard_normal(d, dtype=np.float32)
    return u.astype(np.float32, copy=False)


def estimate_guided(
    loss_fn: Callable[[np.ndarray], float],
    theta: np.ndarray,
    step_seed: int,
    basis: np.ndarray,
    cfg: ZOConfig,
    alpha: float = 0.0,
    loss0: float | None = None,
) -> ZOEstimate:
    """Two-point estimate along `cfg.q` guided directions (module doc): the device's usual
    forward passes, a perturbation drawn in the server's basis instead of all of θ.

    E[grad] = (1-α)·UUᵀ∇l + α(k/d)·∇l; with α = 0 the estimate lies in span(U). Scale the
    SGD step for k, not d: about lr_FO/(k+2). `basis` must pass `check_basis`.
    """
    if cfg.perturb != "full":
        raise ValueError("guided directions span the whole θ; use perturb='full'")
    if basis.shape[0] != theta.size:
        raise ValueError(f"the guided basis has {basis.shape[0]} rows, θ has {theta.size}")
    seeds = direction_seeds(step_seed, cfg.q)
    projected = np.empty(cfg.q, dtype=np.float64)
    if cfg.scheme == "forward" and loss0 is None:
        loss0 = float(loss_fn(theta))
    losses = []
    mu = np.float32(cfg.mu)
    for i, seed in enumerate(seeds):
        u = guided_direction(int(seed), basis, alpha)
        plus = float(loss_fn(theta + mu * u))
        if cfg.scheme == "forward":
            assert loss0 is not None
            projected[i] = (plus - loss0) / cfg.mu
            losses.append(loss0)
        else:
            minus = float(loss_fn(theta - mu * u))
            projected[i] = (plus - minus) / (2 * cfg.mu)
            losses.append(0.5 * (plus + minus))
    proj = projected.astype(np.float32)
    return ZOEstimate(reconstruct_guided(seeds, proj, basis, alpha), proj, seeds,
                      float(np.mean(losses)))


def reconstruct_guided(seeds: np.ndarray, projected: np.ndarray, basis: np.ndarray,
                       alpha: float = 0.0) -> np.ndarray:
    """g = 1/q · Σ p_i u_i from the log and the round's basis (what a server could replay)."""
    grad = np.zeros(basis.shape[0], dtype=np.float32)
    for seed, p in zip(seeds, projected, strict=True):
        grad += np.float32(p) * guided_direction(int(seed), basis, alpha)
    grad *= np.float32(1.0 / len(seeds))
    return grad
