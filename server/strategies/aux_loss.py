"""Aux-loss family (heron, cse-fsl, frozen): devices train on their aux head's loss and
upload smashed data every k-th step; the server trains its part on each upload once and
sends nothing back.

Under --deterministic the uploads are held and trained at the round's end by step, then
device id, whatever order they arrived in (interleaved as they arrive when devices keep
pace, not one device's whole round after another's), so a run repeats bit for bit.
"""

from __future__ import annotations

import numpy as np

from server.strategies.base import ServerStrategy, SmashedOutcome


class AuxLossStrategy(ServerStrategy):
    def begin_round(self, round_idx: int) -> None:
        super().begin_round(round_idx)
        self.seen: dict[str, set[int]] = {}  # device -> steps trained on this round
        self.held: list[tuple[int, str, np.ndarray, np.ndarray]] = []  # --deterministic

    def on_smashed(self, device_id: str, step: int, activations: np.ndarray,
                   labels: np.ndarray) -> SmashedOutcome:
        seen = self.seen.setdefault(device_id, set())
        if step in seen:
            return SmashedOutcome(rejected=f"duplicate smashed: step {step} of round "
                                           f"{self.round} was already trained on")
        seen.add(step)
        if self.deterministic:
            self.held.append((step, device_id, activations, labels))
            return SmashedOutcome()
        return SmashedOutcome(loss=self.trainer.train_step(activations, labels))

    def close_smashed(self) -> list[float]:
        held, self.held = sorted(self.held, key=lambda h: (h[0], h[1])), []
        return [self.trainer.train_step(x, y) for _, _, x, y in held]
