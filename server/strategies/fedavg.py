"""FedAvg family: each device trains the whole model (client and server part) on its data
and uploads only its weights; the global weights carry the server part after the device's,
and the server trains nothing itself."""

from __future__ import annotations

import numpy as np

from server.strategies.base import ServerStrategy, SmashedOutcome
from server.trainer import load_server_flat, server_flat


class FedAvgStrategy(ServerStrategy):
    refuses_smashed = "unexpected smashed data: fedavg devices upload weights only"

    def initial_weights(self, device_weights: np.ndarray) -> np.ndarray:
        return np.concatenate([device_weights, server_flat(self.split.server)])

    def load_global(self, theta: np.ndarray) -> None:
        super().load_global(theta)
        load_server_flat(self.split.server, theta[self.manifest.num_params:])

    def on_smashed(self, device_id: str, step: int, activations: np.ndarray,
                   labels: np.ndarray) -> SmashedOutcome:
        return SmashedOutcome(rejected=self.refuses_smashed)
