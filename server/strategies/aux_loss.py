"""Aux-loss family (heron, cse-fsl, frozen): devices train on their aux head's loss and
upload smashed data every k-th step; the server trains its part on each upload once and
sends nothing back."""

from __future__ import annotations

import numpy as np

from server.strategies.base import ServerStrategy, SmashedOutcome


class AuxLossStrategy(ServerStrategy):
    def begin_round(self, round_idx: int) -> None:
        super().begin_round(round_idx)
        self.seen: dict[str, set[int]] = {}  # device -> steps trained on this round

    def on_smashed(self, device_id: str, step: int, activations: np.ndarray,
                   labels: np.ndarray) -> SmashedOutcome:
        seen = self.seen.setdefault(device_id, set())
        if step in seen:
            return SmashedOutcome(rejected=f"duplicate smashed: step {step} of round "
                                           f"{self.round} was already trained on")
        seen.add(step)
        return SmashedOutcome(loss=self.trainer.train_step(activations, labels))
