"""The first-order baseline devices (cse-fsl, sflv1, sflv2, fedavg) in the federation.

They speak exactly the ONNX Runtime device's protocol (the loop is `edge_runtime.device`'s,
reused by subclassing) and only swap the model: the bundle's manifest names the model and
cut, the split is rebuilt in PyTorch and trained with backprop. Torch lives here, never in
`edge_runtime/`, which stays the torch-free core a board installs.

- ``cse-fsl``: client + aux head on the local loss; smashed data every k-th step (as heron).
- ``sflv1`` / ``sflv2`` (SplitFed): no aux head. Every step the smashed data go up and the
  device waits for the server's cut-layer gradient, then backpropagates it into the client.
- ``fedavg``: the whole model (client + server part) trained on the device; no smashed data.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.algorithms import TORCH_ALGORITHMS, algorithm
from edge_runtime.bundle import Bundle
from edge_runtime.data import BatchSampler
from edge_runtime.device import Device, DeviceOptions
from edge_runtime.manifest import Manifest
from edge_runtime.protocol import RoundStart, TrainConfig
from edge_runtime.runtime import RoundResult, rss_mb
from edge_runtime.transport import Transport
from exporter.export import flat_from_split, load_flat_into
from exporter.zoo import SplitModel, build_split
from server.trainer import load_server_flat, server_flat

TORCH_DEVICE_ALGORITHMS = TORCH_ALGORITHMS  # the registry's runtime="torch" algorithms
GRADIENT_TIMEOUT_S = 120.0  # SplitFed: how long a device waits for one cut-layer gradient

# (step, smashed activations, labels) -> (dL/d smashed, server loss)
Exchange = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, float]]


def split_for(manifest: Manifest) -> SplitModel:
    """Rebuild the bundle's split in torch (weights are overwritten by every round start)."""
    options = dict(manifest.extra.get("options", {}))
    return build_split(manifest.model, tuple(manifest.input_shape),  # type: ignore[arg-type]
                       manifest.num_classes, cut=manifest.cut, **options)


def check_shard(manifest: Manifest, x: np.ndarray, y: np.ndarray) -> None:
    """Refuse a shard that does not fit the bundle, before any training."""
    if tuple(x.shape[1:]) != tuple(manifest.input_shape):
        raise ValueError(f"shard samples have shape {tuple(x.shape[1:])} but the bundle "
                         f"({manifest.model}) expects {tuple(manifest.input_shape)}; help: "
                         "partition the same dataset the server uses")
    if y.size and (int(y.max()) >= manifest.num_classes or int(y.min()) < 0):
        raise ValueError(f"shard has labels in {int(y.min())}..{int(y.max())} but the bundle "
                         f"has {manifest.num_classes} classes")


def weights_size(split: SplitModel, manifest: Manifest, name: str) -> int:
    """Length of the global weight vector: client+aux, plus the server part where the
    device trains the whole model (fedavg)."""
    extra = server_flat(split.server).size if algorithm(name).ships_server_part else 0
    return manifest.num_params + extra


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)


def train_round_torch(
    split: SplitModel,
    manifest: Manifest,
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    *,
    round_idx: int,
    device_id: str,
    on_smashed: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    exchange: Exchange | None = None,
) -> RoundResult:
    """h first-order steps from the global weights `theta` on the local shard.

    Batches are drawn exactly as the ZO device draws them (same sampler, same seeds), so
    algorithms differ only in how they train.
    """
    alg = cfg.algorithm
    a = algorithm(alg)
    if a.runtime != "torch":
        raise ValueError(f"the torch device runs {TORCH_DEVICE_ALGORITHMS}, not {alg!r}")
    if a.waits_for_gradient and exchange is None:
        raise ValueError(f"{alg} needs the server's gradient each step; pass `exchange`")
    if not np.all(np.isfinite(theta)):
        raise ValueError("the starting weights contain NaN or Inf; refusing to train on them")
    n = manifest.num_params
    load_flat_into(split, manifest, theta[:n])
    if a.ships_server_part:
        load_server_flat(split.server, theta[n:])
    trained = [getattr(split, part) for part in a.trained_parts]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    for m in (split.client, split.aux, split.server):
        m.train()
    opt = _optimizer(params, cfg)
    sampler = BatchSampler(len(y), cfg.batch_size, np.random.default_rng(
        [cfg.seed, round_idx, zlib.crc32(device_id.encode())]))
    losses, times, sent = [], [], 0
    for step in range(cfg.local_steps):
        t0 = time.perf_counter()
        idx = sampler.next_indices()
        xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx].astype(np.int64))
        opt.zero_grad(set_to_none=True)
        if a.ships_server_part:  # fedavg: the whole model's loss, on the device
            loss = F.cross_entropy(split.server(split.client(xb)), yb)
            loss.backward()
            losses.append(float(loss.detach()))
        elif a.aux_loss:  # cse-fsl
            smashed = split.client(xb)
            loss = F.cross_entropy(split.aux(smashed), yb)
            if on_smashed is not None and step % cfg.upload_every == 0:
                on_smashed(step, smashed.detach().numpy().copy(), y[idx])
                sent += 1
            loss.backward()
            losses.append(float(loss.detach()))
        else:  # SplitFed: the loss lives on the server, the gradient comes back
            assert exchange is not None
            smashed = split.client(xb)
            act = smashed.detach().numpy().copy()
            grad, server_loss = exchange(step, act, y[idx])
            sent += 1
            if grad.shape != act.shape or grad.dtype != np.float32 or \
                    not np.all(np.isfinite(grad)):
                raise ValueError(f"the server's gradient for step {step} has shape "
                                 f"{grad.shape} / dtype {grad.dtype} or is not finite; "
                                 f"expected finite float32 {act.shape}")
            smashed.backward(torch.from_numpy(grad))
            losses.append(float(server_loss))
        opt.step()
        times.append((time.perf_counter() - t0) * 1000.0)
        rss_mb()
    out = flat_from_split(split, manifest)
    if a.ships_server_part:
        out = np.concatenate([out, server_flat(split.server)])
    if not np.all(np.isfinite(out)):
        raise FloatingPointError(f"{alg} weights became NaN/Inf in round {round_idx}; help: "
                                 "lower the device learning rate")
    empty = np.zeros(0, np.uint64)
    return RoundResult(out, empty, np.zeros(0, np.float32), losses, times, sent)


@dataclass
class _Model:
    split: SplitModel
    manifest: Manifest


class TorchDevice(Device):
    """`heron device --torch`: the same network loop, a PyTorch model, backprop training."""

    algorithms = TORCH_DEVICE_ALGORITHMS
    checks_memory = False  # the board memory check measures ONNX Runtime steps

    @staticmethod
    def prepare_process(opts: DeviceOptions) -> None:
        """Nothing process-wide: torch has its own threads (set in __init__)."""

    def __init__(self, opts: DeviceOptions, transport: Transport | None = None) -> None:
        if opts.threads:
            torch.set_num_threads(opts.threads)
        super().__init__(opts, transport)

    def _make_model(self, bundle: Bundle) -> tuple[object, int | None]:
        check_shard(bundle.manifest, self.x, self.y)
        return _Model(split_for(bundle.manifest), bundle.manifest), torch.get_num_threads()

    def _expected_weights(self, cfg: TrainConfig) -> int:
        assert isinstance(self.model, _Model)
        return weights_size(self.model.split, self.model.manifest, cfg.algorithm)

    def _train(self, msg: RoundStart, cfg: TrainConfig,
               send_smashed: Callable[[int, np.ndarray, np.ndarray], None]) -> RoundResult:
        assert isinstance(self.model, _Model)

        def exchange(step: int, act: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
            send_smashed(step, act, labels)
            reply = self.await_gradient(msg.round, step, GRADIENT_TIMEOUT_S)
            return reply.grad, reply.loss

        return train_round_torch(self.model.split, self.model.manifest,
                                 msg.weights.astype(np.float32), self.x, self.y, cfg,
                                 round_idx=msg.round, device_id=self.opts.device_id,
                                 on_smashed=send_smashed,
                                 exchange=exchange
                                 if algorithm(cfg.algorithm).waits_for_gradient else None)
