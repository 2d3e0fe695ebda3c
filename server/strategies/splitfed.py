"""SplitFed family (sflv1, sflv2): every step a device uploads its smashed data and waits
for the cut-layer gradient, which the server computes while it trains its part. V2 trains
one server model in arrival order; V1 trains one copy per device and averages the copies of
the devices whose update arrived at round end."""

from __future__ import annotations

import copy

import numpy as np

from server.aggregate import DeviceUpdate
from server.strategies.base import ServerStrategy, SmashedOutcome
from server.trainer import ServerTrainer, average_modules


class SplitFedStrategy(ServerStrategy):
    def begin_round(self, round_idx: int) -> None:
        super().begin_round(round_idx)
        self.copies: dict[str, ServerTrainer] = {}  # V1: one server copy per device
        self.answers: dict[tuple[str, int], tuple[np.ndarray, float]] = {}

    def on_smashed(self, device_id: str, step: int, activations: np.ndarray,
                   labels: np.ndarray) -> SmashedOutcome:
        key = (device_id, step)
        answer = self.answers.get(key)
        if answer is not None:  # a redelivered step gets the same answer, not a second step
            return SmashedOutcome(gradient=answer[0], reply_loss=answer[1])
        trainer = self.trainer
        if self.algorithm.server_copy_per_device:
            if device_id not in self.copies:
                self.copies[device_id] = copy.deepcopy(self.trainer)
            trainer = self.copies[device_id]
        loss, grad = trainer.train_step_grad(activations, labels)
        assert grad is not None
        self.answers[key] = (grad, loss)
        return SmashedOutcome(loss=loss, gradient=grad, reply_loss=loss)

    def end_round(self, updates: dict[str, DeviceUpdate]) -> None:
        """V1: average the server copies of the devices whose update arrived."""
        kept = [d for d in sorted(self.copies) if d in updates]
        if not kept:
            return
        w = [float(updates[d].num_samples) if self.weighting == "samples" else 1.0
             for d in kept]
        average_modules(self.trainer.model, [self.copies[d].model for d in kept], w)
