"""The interface every server strategy implements, and what a smashed upload comes to.

A strategy is what differs between algorithms on the server: the global weights a round
ships, what the server does with a smashed batch (train on it, answer with the cut-layer
gradient, keep a copy per device), and what it merges at round end. The loop in
`server.loop` owns the network, validation and counting; it calls these methods and never
asks for an algorithm's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.algorithms import Algorithm
from edge_runtime.manifest import Manifest
from exporter.export import load_flat_into
from exporter.zoo import SplitModel
from server.aggregate import DeviceUpdate
from server.trainer import ServerTrainer


@dataclass(frozen=True)
class SmashedOutcome:
    """What the server made of one smashed upload that passed the loop's checks."""

    rejected: str | None = None  # why it was refused (the loop counts the rejection)
    loss: float | None = None  # the server loss of a training step it caused, if any
    gradient: np.ndarray | None = None  # dL/d(smashed) to send back (SplitFed)
    reply_loss: float = 0.0  # the loss the gradient reply carries


class ServerStrategy:
    """The aux-loss behaviour is the default; families override what differs."""

    # Smashed data are not part of this algorithm's round: why an upload is refused.
    refuses_smashed: str | None = None

    def __init__(self, algorithm: Algorithm, trainer: ServerTrainer, split: SplitModel,
                 manifest: Manifest, weighting: str = "samples", *,
                 deterministic: bool = False) -> None:
        self.algorithm = algorithm
        self.deterministic = deterministic  # --deterministic: a fixed training order
        self.trainer = trainer
        self.split = split
        self.manifest = manifest
        self.weighting = weighting

    # -- what a round ships ----------------------------------------------------------------
    def initial_weights(self, device_weights: np.ndarray) -> np.ndarray:
        """The global weight vector of round 1, from the bundle's device weights."""
        return device_weights

    def load_global(self, theta: np.ndarray) -> None:
        """Put the aggregated global weights into the torch split (for evaluation)."""
        load_flat_into(self.split, self.manifest, theta[:self.manifest.num_params])

    # -- a round ---------------------------------------------------------------------------
    def begin_round(self, round_idx: int) -> None:
        """Forget the previous round's per-round state."""
        self.round = round_idx

    def on_smashed(self, device_id: str, step: int, activations: np.ndarray,
                   labels: np.ndarray) -> SmashedOutcome:
        raise NotImplementedError

    def close_smashed(self) -> list[float]:
        """Train what `on_smashed` held for the round's end; the losses of those steps."""
        return []

    def end_round(self, updates: dict[str, DeviceUpdate]) -> None:
        """Merge what the round trained apart (after the device weights are aggregated)."""
