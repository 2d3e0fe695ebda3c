"""Seed-replayed device updates (`--device-sync replay`): a ZO device's round rebuilt from
its log.

A ZO round is a pure function of its starting weights, the training config and the log
the device keeps anyway: per step, q direction seeds and q projected gradients. The device
steps with `zo.apply(θ, zo.reconstruct(seeds, projected), state)` from a fresh optimizer
state (`runtime.train_round` resets Adam's m, v and step count every round), so running
the same two functions over the log from the same θ gives the same float32 weights bit for
bit, provided both sides run them the same way: the same numpy (PCG64 and float32
`standard_normal`, the element-wise float32 arithmetic), the same direction distribution
(`sphere` also takes a norm, a reduction whose order numpy picks per CPU), the same
perturbation mode and block table (the manifest's segments). `weights_hash` is how a
mismatch is caught rather than averaged: the device sends the hash of the weights it
ended with, the server compares it with the hash of its replay.

Pure numpy; the server imports it, the device only hashes with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from edge_runtime import zo
from edge_runtime.protocol.config import TrainConfig

HASH_BYTES = 16  # of sha256: a collision by chance is out of reach, a forged one is moot


def weights_hash(theta: np.ndarray) -> str:
    """The first 16 bytes of sha256 over θ as little-endian float32, in hex (32 chars)."""
    data = np.ascontiguousarray(theta, dtype="<f4").tobytes()
    return hashlib.sha256(data).digest()[:HASH_BYTES].hex()


def expected_seeds(step_seeds: Sequence[int], q: int) -> np.ndarray:
    """The direction seeds a round's steps draw (`zo.direction_seeds` of each step's seed),
    in log order, without block tags."""
    if not step_seeds:
        return np.zeros(0, dtype=np.uint64)
    return np.concatenate([zo.direction_seeds(int(s), q) for s in step_seeds])


def check_log(seeds: np.ndarray, projected: np.ndarray, step_seeds: Sequence[int],
              cfg: TrainConfig, blocks: int) -> str | None:
    """Why a round's log cannot be the one `cfg` makes (None if it can): one entry per step
    and direction, each seed the one that step draws (block-wise: its low 56 bits, with a
    block index below `blocks` in the top byte). So a device cannot pick its directions,
    and replay never indexes outside the block table."""
    q = cfg.zo.q
    n = len(step_seeds) * q
    if seeds.shape != (n,) or projected.shape != (n,):
        return (f"a replay log of {seeds.shape[0]} entries; this round's config makes "
                f"{len(step_seeds)} steps x {q} directions = {n}")
    want = expected_seeds(step_seeds, q)
    if cfg.zo.perturb == "block":
        mask = np.uint64(2**zo._TAG_SHIFT - 1)
        tags = seeds >> np.uint64(zo._TAG_SHIFT)
        if n and int(tags.max()) >= blocks:
            return f"a replay log names block {int(tags.max())} of {blocks}"
        want, seeds = want & mask, seeds & mask
    if not np.array_equal(seeds, want):
        bad = int(np.flatnonzero(seeds != want)[0])
        return f"replay log seed {bad} (step {bad // q}) is not the one that step draws"
    return None


def replay_round(theta: np.ndarray, seeds: np.ndarray, projected: np.ndarray,
                 cfg: TrainConfig, blocks: Sequence[tuple[int, int]] | None = None
                 ) -> np.ndarray:
    """The device's end-of-round weights from its starting weights and its log: each step's
    q entries through `zo.reconstruct` and `zo.apply`, as `runtime.train_round` did.

    `blocks`: the manifest segments' (offset, size), needed for `perturb="block"`. Non-finite
    results are returned as they are (the caller's update checks refuse them)."""
    q = cfg.zo.q
    if seeds.shape != projected.shape or seeds.ndim != 1 or seeds.shape[0] % q:
        raise ValueError(f"a log of {seeds.shape} seeds and {projected.shape} projections "
                         f"is not whole steps of q={q}")
    theta = np.asarray(theta, dtype=np.float32)
    state = zo.init_state(theta, cfg.optimizer)
    proj = projected.astype(np.float32, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # a hostile log may overflow
        for i in range(0, seeds.shape[0], q):
            grad = zo.reconstruct(seeds[i:i + q], proj[i:i + q], theta.size, cfg.zo, blocks)
            theta, state = zo.apply(theta, grad, state, cfg.optimizer)
    return theta
