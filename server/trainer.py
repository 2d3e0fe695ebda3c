"""First-order training of the server sub-model and evaluation of the whole model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("adam", "sgd")
Progress = Callable[[int, int], None]  # (examples done, examples in all)


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
        return self.train_step_grad(activations, labels, want_grad=False)[0]

    def train_step_grad(self, activations: np.ndarray, labels: np.ndarray,
                        want_grad: bool = True) -> tuple[float, np.ndarray | None]:
        """One FO step on an upload; with `want_grad`, also dL/d(activations) (SplitFed)."""
        self.model.train()
        x = torch.from_numpy(np.ascontiguousarray(activations)).requires_grad_(want_grad)
        y = torch.from_numpy(labels.astype(np.int64))
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        grad = x.grad.numpy().astype(np.float32) if want_grad and x.grad is not None else None
        return float(loss.detach()), grad


def server_params(server: nn.Module) -> list[nn.Parameter]:
    """The server part's trainable tensors, in module order (fedavg ships them as a vector)."""
    return [p for p in server.parameters() if p.requires_grad]


def server_flat(server: nn.Module) -> np.ndarray:
    params = server_params(server)
    if not params:
        return np.zeros(0, np.float32)
    return np.concatenate([p.detach().cpu().numpy().astype(np.float32).ravel()
                           for p in params])


def load_server_flat(server: nn.Module, flat: np.ndarray) -> None:
    """Copy a flat vector (as `server_flat` makes it) into the server part."""
    params = server_params(server)
    size = sum(p.numel() for p in params)
    if flat.shape != (size,):
        raise ValueError(f"server weights have shape {flat.shape}, expected ({size},)")
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(flat.astype(np.float32).copy()),
                                            params)


def average_modules(target: nn.Module, copies: list[nn.Module], weights: list[float]) -> None:
    """SplitFed V1: the global server part becomes the weighted mean of the per-device copies."""
    if not copies or len(copies) != len(weights):
        raise ValueError("need one weight per server copy, and at least one copy")
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    with torch.no_grad():
        for name, param in target.named_parameters():
            stacked = torch.stack([dict(c.named_parameters())[name].detach().double()
                                   for c in copies])
            mean = (stacked * w.view(-1, *([1] * param.dim()))).sum(0)
            param.copy_(mean.to(param.dtype))


@torch.no_grad()
def evaluate(client: nn.Module, server: nn.Module, x: np.ndarray, y: np.ndarray,
             batch_size: int = 512, progress: Progress | None = None) -> Evaluation:
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
        if progress is not None:
            progress(min(i + batch_size, len(y)), len(y))
    n = len(y)
    return Evaluation(correct / n, total_loss / n, n)
