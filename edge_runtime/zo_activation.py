"""Activation-subspace zeroth-order directions: perturbations inside the span of a layer's
inputs, pure functions (issue 15, item 3).

For a linear map y = W x (W: out × in) the gradient over a batch is G = Σ_b δ_b x_bᵀ, so
every row of G lies in span{x_b}: the row space of the batch's inputs X (n × in). A conv
weight (out × C·kh·kw once flattened) is the same map applied to every im2col patch, so X
is the batch's patches (`im2col`). With P (in × r) the top-r right singular vectors of X
(uncentered: the mean input is a direction the gradient uses), the device perturbs W by
U = Z Pᵀ, Z ~ N(0, I) (out × r), and needs no server, guide data or backward pass: P comes
from the forward pass it runs anyway.

Why it can help: a two-point estimate g = s·u along u ~ N(0, I_d) has E‖g‖² ≈ (d+2)‖∇l‖²,
so the stable SGD step is about lr_FO/(d+2). With u = vec(Z Pᵀ), E[g] = ∇l·(I ⊗ PPᵀ) (the
gradient projected on the subspace) and E‖g‖² ≈ (d_eff+2)‖∇l·PPᵀ‖², d_eff = out·r: the
step can be lr_FO/(d_eff+2), and progress per step is ρ²·(d+2)/(d_eff+2) times random's,
where ρ² = ‖G PPᵀ‖²/‖G‖² (`subspace_share`) is the share of the gradient kept. When r is
at least the rank of X (a linear layer fed by rank-r inputs) ρ² = 1 and the speed-up is
(d+2)/(d_eff+2). Biases (no input) are not perturbed by this mode.

Several weights of one flat θ are described by an `ActLayer` each (offset, out, P); the
direction is zero outside them. The seeds, finite differences and `ZOEstimate` are the
isotropic estimator's (`edge_runtime.zo`): only the direction a seed stands for differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.protocol.config import ZOConfig
from edge_runtime.zo import ZOEstimate, direction_seeds


@dataclass(frozen=True)
class ActLayer:
    """One perturbed weight of θ: its flat offset, its rows (out) and its input basis P
    (in × r, orthonormal columns); the weight is θ[offset:offset + out·in] row-major."""

    offset: int
    out: int
    basis: np.ndarray

    @property
    def size(self) -> int:
        return self.out * self.basis.shape[0]

    @property
    def d_eff(self) -> int:
        return self.out * self.basis.shape[1]


def _check_inputs(x: np.ndarray, what: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim or 0 in arr.shape:
        raise ValueError(f"{what} must be a non-empty {ndim}-d array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must hold floats, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or Inf; help: check the layer's forward pass")
    return arr


def input_gram(x: np.ndarray) -> np.ndarray:
    """XᵀX in float64 for inputs X (n × in): what a running estimate over batches sums."""
    arr = _check_inputs(x, "layer inputs X", 2).astype(np.float64)
    return arr.T @ arr


def basis_from_gram(gram: np.ndarray, r: int) -> np.ndarray:
    """P (in × r, float32): the top-r eigenvectors of an (in × in) input Gram matrix
    (= the top-r right singular vectors of X). Directions beyond X's rank are still
    orthonormal (eigh's), so P is always (in × r)."""
    g = _check_inputs(gram, "the input Gram matrix", 2)
    if g.shape[0] != g.shape[1]:
        raise ValueError(f"an input Gram matrix is square, got shape {g.shape}")
    if not isinstance(r, int | np.integer) or not 1 <= r <= g.shape[0]:
        raise ValueError(f"the activation rank r must be an integer in [1, {g.shape[0]}] "
                         f"(the layer's input width), got {r!r}")
    _, vecs = np.linalg.eigh(0.5 * (g + g.T).astype(np.float64))
    return np.ascontiguousarray(vecs[:, ::-1][:, :r]).astype(np.float32)


def activation_basis(x: np.ndarray, r: int) -> np.ndarray:
    """P (in × r): the top-r right singular vectors of the batch's inputs X (n × in)."""
    return basis_from_gram(input_gram(x), r)


def im2col(x: np.ndarray, kh: int, kw: int, stride: int = 1, padding: int = 0) -> np.ndarray:
    """Patches of an (n, C, H, W) input as rows (n·L × C·kh·kw), ordered (C, kh, kw) like a
    conv weight (out, C, kh, kw) flattened row-major, so W_flat @ patch = the conv output."""
    arr = _check_inputs(x, "conv inputs", 4)
    if min(kh, kw, stride) < 1 or padding < 0:
        raise ValueError(f"need kh, kw, stride >= 1 and padding >= 0, got {kh}, {kw}, "
                         f"{stride}, {padding}")
    if padding:
        arr = np.pad(arr, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    n, c, h, w = arr.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kh}x{kw} kernel does not fit a {h}x{w} input")
    win = np.lib.stride_tricks.sliding_window_view(arr, (kh, kw), axis=(2, 3))
    win = win[:, :, ::stride, ::stride][:, :, :oh, :ow]  # (n, C, oh, ow, kh, kw)
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow,
                                                                         c * kh * kw))


def subspace_share(grad: np.ndarray, basis: np.ndarray) -> float:
    """ρ² = ‖G P Pᵀ‖² / ‖G‖² (= ‖G P‖²/‖G‖², P orthonormal): the share of a weight
    gradient G (out × in) that the activation subspace keeps; 0 for a zero gradient."""
    g = _check_inputs(grad, "the gradient G", 2).astype(np.float64)
    p = _check_inputs(basis, "the basis P", 2).astype(np.float64)
    if p.shape[0] != g.shape[1]:
        raise ValueError(f"G has {g.shape[1]} columns but P has {p.shape[0]} rows")
    total = float(np.sum(g * g))
    return float(np.sum((g @ p) ** 2)) / total if total > 0 else 0.0


def check_layers(layers: Sequence[ActLayer], d: int) -> None:
    """ValueError unless every layer fits θ (size d), has an orthonormal float basis, and
    no two overlap."""
    if not layers:
        raise ValueError("activation directions need at least one layer")
    spans = []
    for i, layer in enumerate(layers):
        p = _check_inputs(layer.basis, f"layer {i}'s basis P", 2)
        if layer.out < 1 or p.shape[1] > p.shape[0]:
            raise ValueError(f"layer {i}: need out >= 1 and r <= in, got out={layer.out}, "
                             f"P {p.shape}")
        if layer.offset < 0 or layer.offset + layer.size > d:
            raise ValueError(f"layer {i} ({layer.out}x{p.shape[0]} at {layer.offset}) does "
                             f"not fit in θ of size {d}")
        err = float(np.abs(p.T.astype(np.float64) @ p - np.eye(p.shape[1])).max())
        if err > 1e-3:
            raise ValueError(f"layer {i}'s basis is not orthonormal (max |PᵀP - I| = "
                             f"{err:.3g}); help: build it with activation_basis")
        spans.append((layer.offset, layer.offset + layer.size))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise ValueError("two activation layers overlap in θ")


def activation_direction(seed: int, layers: Sequence[ActLayer], d: int) -> np.ndarray:
    """u (d,) float32 for `seed`: vec(Z_l P_lᵀ) on each layer's weight, Z_l ~ N(0, I)
    (out × r) drawn layer after layer from one PCG64 stream, zero elsewhere."""
    gen = np.random.Generator(np.random.PCG64(int(seed)))
    u = np.zeros(d, dtype=np.float32)
    for layer in layers:
        z = gen.standard_normal((layer.out, layer.basis.shape[1]), dtype=np.float32)
        u[layer.offset:layer.offset + layer.size] = (z @ layer.basis.T).ravel()
    return u


def estimate_activation(
    loss_fn: Callable[[np.ndarray], float],
    theta: np.ndarray,
    step_seed: int,
    layers: Sequence[ActLayer],
    cfg: ZOConfig,
    loss0: float | None = None,
) -> ZOEstimate:
    """Two-point estimate along `cfg.q` activation-subspace directions (module doc).

    E[grad] is ∇l projected on each layer's input subspace; scale the SGD step for
    d_eff = Σ out·r, not d: about lr_FO/(d_eff+2)."""
    if cfg.perturb != "full":
        raise ValueError("activation directions are drawn over θ; use perturb='full'")
    check_layers(layers, theta.size)
    seeds = direction_seeds(step_seed, cfg.q)
    projected = np.empty(cfg.q, dtype=np.float64)
    if cfg.scheme == "forward" and loss0 is None:
        loss0 = float(loss_fn(theta))
    losses = []
    mu = np.float32(cfg.mu)
    for i, seed in enumerate(seeds):
        u = activation_direction(int(seed), layers, theta.size)
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
    return ZOEstimate(reconstruct_activation(seeds, proj, layers, theta.size), proj, seeds,
                      float(np.mean(losses)))


def reconstruct_activation(seeds: np.ndarray, projected: np.ndarray,
                           layers: Sequence[ActLayer], d: int) -> np.ndarray:
    """g = 1/q · Σ p_i u_i from the log and the layers' bases (a replay needs the bases)."""
    grad = np.zeros(d, dtype=np.float32)
    for seed, p in zip(seeds, projected, strict=True):
        grad += np.float32(p) * activation_direction(int(seed), layers, d)
    grad *= np.float32(1.0 / len(seeds))
    return grad
