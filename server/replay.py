"""The server's side of `--device-sync replay`: a device's round weights from its log.

The update carries the round's (seed, projected gradient) log and a hash of the device's
final weights (`edge_runtime.replay`). The server checks the log is the one this round's
config makes (its length, and every seed the one its step draws), replays it from the
round's starting weights with the device's own `edge_runtime.zo` functions, and compares
hashes. A mismatch is never averaged: the loop asks the device for its weights instead
(`WeightsRequest`, answered by a `WeightsReply` checked like any weights update), since an
honest device with another numpy can cause it (README, "Seed-replayed updates"); without
an answer by the round's deadline the update is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edge_runtime.algorithms import algorithm
from edge_runtime.bundle import Manifest
from edge_runtime.protocol import TrainConfig, Update
from edge_runtime.replay import check_log, replay_round, weights_hash
from edge_runtime.zo import step_seed


@dataclass(frozen=True)
class Replayed:
    """What replaying one update gave: the weights, or why there are none."""

    weights: np.ndarray | None
    rejected: str | None  # the whole rejection, its kind first
    seconds: float = 0.0
    mismatch: bool = False  # a well-formed log that did not replay to the device's hash


def replay_update(msg: Update, start: np.ndarray, cfg: TrainConfig, manifest: Manifest,
                  round_idx: int, device_id: str) -> Replayed:
    """The weights `msg` stands for. Updates of the other form than `cfg.device_sync` asks
    for are refused, so a device cannot choose which check it goes through; an algorithm
    whose devices do not train (`frozen`) sends no weights and stands for the round's start."""
    has_log = msg.weights_hash is not None
    if not algorithm(cfg.algorithm).sends_weights:  # frozen: the round's own weights
        if has_log or msg.weights.shape[0]:
            return Replayed(None, f"bad update: weights or a log, but {cfg.algorithm} devices "
                                  "never change their weights and send none")
        return Replayed(start, None)
    if cfg.device_sync != "replay":
        if has_log:
            return Replayed(None, "bad update: a replay log, but this run syncs weights "
                                  "(--device-sync weights)")
        return Replayed(msg.weights, None)
    if not has_log:
        return Replayed(None, "bad update: weights, but this run replays device logs "
                              "(--device-sync replay)")
    blocks = tuple((s.offset, s.size) for s in manifest.segments)
    seeds = [step_seed(cfg.seed, round_idx, device_id, s) for s in range(cfg.local_steps)]
    why = check_log(msg.seeds, msg.projected, seeds, cfg, len(blocks))
    if why:
        return Replayed(None, f"bad update: {why}")
    t0 = time.perf_counter()
    theta = replay_round(start, msg.seeds, msg.projected, cfg,
                         blocks if cfg.zo.perturb == "block" else None)
    seconds = time.perf_counter() - t0
    got = weights_hash(theta)
    if got != msg.weights_hash:
        return Replayed(None, f"replay mismatch: the replayed weights hash to {got}, the "
                              f"device's to {msg.weights_hash}; help: the same numpy version "
                              "on server and device, or --device-sync weights", seconds,
                        mismatch=True)
    return Replayed(theta, None, seconds)
