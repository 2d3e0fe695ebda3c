"""Zeroth-order gradient estimation and the optimizers fed by it: pure functions.

Everything works on one flat float32 parameter vector. A direction is never stored: it is
regenerated from an integer seed with numpy's PCG64, which is portable across platforms,
so the round's (seed, projected gradient) log describes every update exactly.

Block-wise perturbation (``perturb="block"``): each direction lives in one block (a
contiguous slice of θ, one bundle segment) instead of all of θ, and the device re-runs the
network only from that block on (`edge_runtime.blockzo`). Block j is drawn with
probability p_j and its estimate weighted by 1/p_j, which keeps the estimate unbiased for
any p. The choice of p is about Adam: with a noise-dominated estimate ĝ, Adam moves each
coordinate by about lr · E[ĝ_i] / sqrt(E[ĝ_i²]). For the full estimate that is
lr · g_i / ‖g‖; block-wise it is lr · g_i · sqrt(p_j) / ‖g_j‖, so the loss falls by
lr · Σ_j sqrt(p_j) ‖g_j‖ per step against lr · ‖g‖: equal exactly when
p_j = ‖g_j‖² / ‖g‖², lower for any other p. Gradient energy is far from proportional to
block size: on resnet18/layer1 (digits, at init) the aux head holds ~0.4% of the parameters
and ~37% of ‖g‖² (layer1.1 ~40%, layer1.0 ~23%, stem ~0.2%). So p follows a running estimate of each
block's energy (`BlockSampler`). That is also the cheap choice: the block drawn most, the
aux head, costs almost nothing to re-run. The log stays self-describing: each direction's
seed carries its block index and its projection the weight 1/p_j (`estimate_blocks`), so
(seed, projected) pairs plus the blocks' (offset, size) still describe every update, and
the sampler's state can carry over from round to round on the device.

Guided directions, drawn in a basis the server sends, are in `edge_runtime.zo_guided`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.protocol.config import OptimizerConfig, ZOConfig

_BLOCK_KEY = 0x626C6F636B  # "block": separates the block draw from the direction's stream
BLOCK_FLOOR = 0.2  # share of block draws spread uniformly (BlockSampler)
BLOCK_MEMORY = 0.1  # weight of a new squared projection in a block's energy estimate
_TAG_SHIFT = 56  # a logged block-wise seed keeps its block index in the top byte
MAX_BLOCKS = 2 ** (64 - _TAG_SHIFT)


@dataclass(frozen=True)
class ZOEstimate:
    grad: np.ndarray  # the estimate g, same shape as θ
    projected: np.ndarray  # one scalar per direction: the finite difference along it
    seeds: np.ndarray  # uint64 seed of each direction
    loss: float  # l(θ) for forward differences, else the mean of the two evaluations
    blocks: np.ndarray = field(  # block of each direction (perturb="block"), else empty
        default_factory=lambda: np.zeros(0, dtype=np.int64))
    probs: np.ndarray = field(  # the probability each block was drawn with, else empty
        default_factory=lambda: np.zeros(0, dtype=np.float64))


def step_seed(base: int, round_idx: int, device_id: str, step: int) -> int:
    """A distinct, reproducible integer seed per (run seed, round, device, step)."""
    key = zlib.crc32(device_id.encode())
    return int(np.random.SeedSequence([base, round_idx, key, step]).generate_state(
        1, dtype=np.uint64)[0])


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


@dataclass(frozen=True)
class BlockSampler:
    """Which block each block-wise direction perturbs; its state passes from step to step.

    p_j = (1 - BLOCK_FLOOR) · e_j / Σ e + BLOCK_FLOOR / J over the blocks with parameters,
    e_j an estimate of ‖∇_j l‖² (the block's share of the gradient's energy): with
    p_j ∝ ‖∇_j‖² Adam's per-coordinate drift on every block equals the full estimate's,
    and no other p does as well (module doc). e_j is a moving average of the squared
    projections of the block's own draws (E[s²] = ‖∇_j‖² for a Gaussian u_j); a block not
    drawn yet counts as the mean of those drawn, so a fresh sampler is uniform. The floor
    keeps every block drawn and its weight 1/p_j bounded. A device carries it from round to
    round (`train_round(block_sampler=...)`): 40 steps are few to learn the energies in.
    """

    sizes: tuple[int, ...]
    energy: tuple[float, ...]  # e_j; NaN until block j is first drawn

    @staticmethod
    def start(sizes: Sequence[int]) -> BlockSampler:
        if sum(sizes) <= 0 or any(s < 0 for s in sizes):
            raise ValueError("block-wise ZO needs at least one block with parameters")
        if len(sizes) > MAX_BLOCKS:
            raise ValueError(f"block-wise ZO handles at most {MAX_BLOCKS} blocks")
        return BlockSampler(tuple(int(s) for s in sizes), (float("nan"),) * len(sizes))

    def probs(self) -> np.ndarray:
        live = np.asarray(self.sizes) > 0
        energy = np.asarray(self.energy, dtype=np.float64)
        seen = live & ~np.isnan(energy)
        prior = float(energy[seen].mean()) if seen.any() else 1.0
        energy = np.where(seen, energy, prior)
        energy = np.where(live, energy, 0.0)
        total = float(energy.sum())
        share = energy / total if total > 0 else live / live.sum()
        return (1 - BLOCK_FLOOR) * share + BLOCK_FLOOR * live / live.sum()

    def draw(self, seed: int) -> int:
        """The block for direction seed `seed`: a hash of the seed against `probs()`."""
        word = np.random.SeedSequence([int(seed), _BLOCK_KEY]).generate_state(1, np.uint64)[0]
        uniform = (int(word) >> 11) * 2.0**-53  # 53 random bits, exact in float64
        edges = np.cumsum(self.probs())
        return int(min(np.searchsorted(edges, uniform * edges[-1], side="right"),
                       len(self.sizes) - 1))

    def observe(self, blocks: Sequence[int], projected: Sequence[float],
                cfg: ZOConfig) -> BlockSampler:
        """The sampler after a step whose directions drew `blocks` and measured the (raw,
        unweighted) finite differences `projected`."""
        energy = list(self.energy)
        for j, p in zip(blocks, projected, strict=True):
            sample = float(p) ** 2 * _scale(self.sizes[int(j)], cfg)  # ≈ ‖∇_j‖²
            old = energy[int(j)]
            energy[int(j)] = sample if np.isnan(old) else (
                (1 - BLOCK_MEMORY) * old + BLOCK_MEMORY * sample)
        return BlockSampler(self.sizes, tuple(energy))


def tag_seed(seed: int, block: int) -> int:
    """A block-wise direction's seed as logged: the block index in the top byte, so the
    (seed, projected) log names each direction's block without the sampler's state."""
    if not 0 <= block < MAX_BLOCKS:
        raise ValueError(f"block-wise ZO handles at most {MAX_BLOCKS} blocks, got {block + 1}")
    return (int(seed) & (2**_TAG_SHIFT - 1)) | (int(block) << _TAG_SHIFT)


def seed_block(seed: int) -> int:
    """The block a logged block-wise seed perturbed (`tag_seed`)."""
    return int(seed) >> _TAG_SHIFT


def estimate_blocks(
    loss_from: Callable[[int, np.ndarray], float],
    theta: np.ndarray,
    blocks: Sequence[tuple[int, int]],
    step_seed: int,
    cfg: ZOConfig,
    sampler: BlockSampler,
    loss0: float | None = None,
) -> ZOEstimate:
    """Block-wise two-point estimate: each direction perturbs one block of θ only.

    `blocks` are (offset, size) slices tiling θ; `loss_from(j, values)` is l(θ) with block
    j's slice replaced by `values` (the caller re-runs the network from block j on).
    `sampler` draws the blocks (the caller knows them in advance from the same sampler and
    seeds, and feeds the raw projections, projected · probs, to `sampler.observe`).
    `loss0` = l(θ), required for forward differences.

    The estimate logs each direction as (`tag_seed`(seed, j), s_i / p_j): the direction is
    regenerated from the tagged seed and the projection already carries the importance
    weight, so `reconstruct` needs only the log and the blocks' slices.
    """
    if cfg.perturb != "block":
        raise ValueError("zo.estimate_blocks needs a ZOConfig with perturb='block'")
    if sum(size for _, size in blocks) != theta.size or len(blocks) != len(sampler.sizes):
        raise ValueError(f"blocks cover {sum(size for _, size in blocks)} of the "
                         f"{theta.size} parameters, or do not match the sampler")
    if cfg.scheme == "forward" and loss0 is None:
        raise ValueError("forward differences need loss0 = l(θ) from the unperturbed pass")
    probs = sampler.probs()
    chosen = np.asarray([sampler.draw(int(s)) for s in direction_seeds(step_seed, cfg.q)],
                        dtype=np.int64)
    seeds = np.asarray([tag_seed(int(s), int(j)) for s, j in
                        zip(direction_seeds(step_seed, cfg.q), chosen, strict=True)],
                       dtype=np.uint64)
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
    drawn = probs[chosen]
    weighted = (projected / drawn).astype(np.float32)
    grad = reconstruct(seeds, weighted, theta.size, cfg, blocks)
    return ZOEstimate(grad, weighted, seeds, float(np.mean(losses)), chosen, drawn)


def reconstruct(seeds: np.ndarray, projected: np.ndarray, d: int, cfg: ZOConfig,
                blocks: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """g = scale/q · Σ p_i u_i, rebuilt from the log alone (what a server could replay).

    Block-wise: `blocks` are the (offset, size) slices (the manifest's segments); u_i lives
    in the block `seed_block(seed_i)` names and carries that block's own scale (p_i already
    holds the importance weight, see `estimate_blocks`).
    """
    grad = np.zeros(d, dtype=np.float32)
    if cfg.perturb == "block":
        if blocks is None:
            raise ValueError("block-wise estimates are rebuilt with the blocks' (offset, "
                             "size); help: pass the bundle manifest's segments")
        for seed, p in zip(seeds, projected, strict=True):
            offset, size = blocks[seed_block(int(seed))]
            weight = np.float32(p) * np.float32(_scale(size, cfg))
            grad[offset:offset + size] += weight * direction(int(seed), size, cfg.distribution)
        grad *= np.float32(1.0 / len(seeds))
        return grad
    for seed, p in zip(seeds, projected, strict=True):
        grad += np.float32(p) * direction(int(seed), d, cfg.distribution)
    grad *= np.float32(_scale(d, cfg) / len(seeds))
    return grad


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
