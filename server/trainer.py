"""First-order training of the server sub-model and evaluation of the whole model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    samples: int


class ServerTrainer:
    """One server model trained on every smashed-data upload as it arrives (SplitFed V2)."""

    def __init__(self, server: nn.Module, *, optimizer: str = "adam", lr: float = 1e-3,
                 smashed_shape: tuple[int, ...], num_classes: int) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"server optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.model = server
        self.smashed_shape = tuple(smashed_shape)
        self.num_classes = num_classes
        params = [p for p in server.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.Adam(params, lr=lr) if optimizer == "adam"
            else torch.optim.SGD(params, lr=lr, momentum=0.9))
        self.steps = 0

    def check_batch(self, activations: np.ndarray, labels: np.ndarray,
                    max_abs: float = 1e6) -> str | None:
        """Why an upload must not be trained on, or None if it may."""
        if activations.dtype != np.float32:
            return f"activations have dtype {activations.dtype}, expected float32"
        if activations.ndim < 1 or tuple(activations.shape[1:]) != self.smashed_shape:
            return (f"activations have shape {activations.shape}, expected "
                    f"(batch, {', '.join(map(str, self.smashed_shape))})")
        if labels.shape != (activations.shape[0],) or labels.dtype.kind not in "iu":
            return f"labels have shape {labels.shape} / dtype {labels.dtype}, expected " \
                   f"({activations.shape[0]},) integers"
        if activations.shape[0] == 0:
            return "empty batch"
        if labels.min() < 0 or labels.max() >= self.num_classes:
            return f"labels outside 0..{self.num_classes - 1}"
        if not np.all(np.isfinite(activations)):
            return "activations contain NaN or Inf"
        if float(np.abs(activations).max()) > max_abs:
            return f"activations exceed |{max_abs:g}|"
        return None

    def train_step(self, activations: np.ndarray, labels: np.ndarray) -> float:
        self.model.train()
        x = torch.from_numpy(np.ascontiguousarray(activations))
        y = torch.from_numpy(labels.astype(np.int64))
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return float(loss.detach())


@torch.no_grad()
def evaluate(client: nn.Module, server: nn.Module, x: np.ndarray, y: np.ndarray,
             batch_size: int = 512) -> Evaluation:
    """Accuracy and mean loss of server(client(x)); the aux head plays no part."""
    client.eval()
    server.eval()
    correct, total_loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[i:i + batch_size])
        yb = torch.from_numpy(y[i:i + batch_size])
        logits = server(client(xb))
        total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = len(y)
    return Evaluation(correct / n, total_loss / n, n)
