"""Server strategies: one module per algorithm family, one strategy per registered algorithm.

`server_strategy(name, ...)` is the one place the server turns an algorithm's name into
behaviour; `STRATEGIES` maps each family of `edge_runtime.algorithms` to its class, and a
test checks that every registered algorithm has one.
"""

from __future__ import annotations

from edge_runtime.algorithms import ALGORITHMS, Algorithm, algorithm
from edge_runtime.manifest import Manifest
from exporter.zoo import SplitModel
from server.strategies.aux_loss import AuxLossStrategy
from server.strategies.base import ServerStrategy, SmashedOutcome
from server.strategies.fedavg import FedAvgStrategy
from server.strategies.splitfed import SplitFedStrategy
from server.trainer import ServerTrainer

STRATEGIES: dict[str, type[ServerStrategy]] = {
    "aux-loss": AuxLossStrategy,
    "splitfed": SplitFedStrategy,
    "fedavg": FedAvgStrategy,
}

__all__ = ["STRATEGIES", "AuxLossStrategy", "FedAvgStrategy", "ServerStrategy",
           "SmashedOutcome", "SplitFedStrategy", "server_strategy"]


def server_strategy(name: str, trainer: ServerTrainer, split: SplitModel, manifest: Manifest,
                    weighting: str = "samples", *, deterministic: bool = False,
                    registry: dict[str, Algorithm] = ALGORITHMS) -> ServerStrategy:
    """The strategy that runs algorithm `name` on this server (ValueError if unknown)."""
    alg = algorithm(name, registry)
    cls = STRATEGIES.get(alg.family)
    if cls is None:
        raise ValueError(f"algorithm {name!r} is of family {alg.family!r}, which has no "
                         f"server strategy; help: add one to server.strategies.STRATEGIES")
    strategy = cls(alg, trainer, split, manifest, weighting, deterministic=deterministic)
    strategy.begin_round(0)
    return strategy
