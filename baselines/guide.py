"""The server's side of guided ZO (issue 15): gradients through its torch copy of the device.

The server already holds the device part (it rebuilds the split from the bundle) and its
own part. On a guide set that no device receives (SST-2: rows of ``dev.tsv``, which the
federation never hands out) it computes the gradient of the *full* model's loss,
server(client(x)), with respect to the device's trainable tensors, one gradient per guide
batch, and sends the top-k left singular vectors of that (d, m) matrix as the round's
basis (`edge_runtime.zo_guided.orthonormal_basis`). Aux tensors are not in the full model, so
their rows of the basis are zero: with the aux head a copy of the server (layer5,
``--aux-from-server``) a guided step moves exactly what the evaluated model uses.

Everything is in the flat manifest order the device uses. Torch lives here, not in
`edge_runtime/`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.manifest import Manifest
from edge_runtime.zo_guided import orthonormal_basis
from exporter.export import ROLE_PREFIXES
from exporter.zoo import SplitModel

if TYPE_CHECKING:
    from baselines.progress import Setting

GUIDE_KEY = 0x6775696465  # "guide": the guide draw's stream, apart from the batches'


def manifest_params(split: SplitModel, manifest: Manifest) -> list[nn.Parameter | None]:
    """The split's parameter for each manifest entry (None for aux: not in the full model)."""
    out: list[nn.Parameter | None] = []
    for spec in manifest.params:
        if spec.role != "client":
            out.append(None)
            continue
        out.append(split.client.get_parameter(spec.name[len(ROLE_PREFIXES["client"]):]))
    return out


def client_mask(manifest: Manifest) -> np.ndarray:
    """True on the flat coordinates that belong to the client (not the aux head)."""
    mask = np.zeros(manifest.num_params, dtype=bool)
    for spec in manifest.params:
        if spec.role == "client":
            mask[spec.offset:spec.offset + spec.size] = True
    return mask


def load_device(split: SplitModel, manifest: Manifest, theta: np.ndarray) -> None:
    """Copy the flat device vector into the split's client and aux tensors.

    `exporter.export.load_flat_into` without its check that the trainable set matches the
    bundle: inside `grads_for` the trainable set is deliberately different."""
    owners = {"client": split.client, "aux": split.aux}
    flat = np.asarray(theta, dtype=np.float32)
    if flat.shape != (manifest.num_params,):
        raise ValueError(f"flat weights have shape {flat.shape}, expected "
                         f"({manifest.num_params},)")
    with torch.no_grad():
        for spec in manifest.params:
            param = owners[spec.role].get_parameter(spec.name[len(ROLE_PREFIXES[spec.role]):])
            param.copy_(torch.from_numpy(
                flat[spec.offset:spec.offset + spec.size].reshape(spec.shape)))


@contextmanager
def grads_for(split: SplitModel, params: list[nn.Parameter]) -> Iterator[None]:
    """Inside: only `params` require grad (the server part and frozen weights do not, so
    backprop stops where nothing below needs it); restored on exit."""
    every = [p for m in (split.client, split.aux, split.server) for p in m.parameters()]
    saved = [p.requires_grad for p in every]
    wanted = {id(p) for p in params}
    try:
        for p in every:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in zip(every, saved, strict=True):
            p.requires_grad_(flag)


def full_loss(split: SplitModel, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """Mean cross-entropy of server(client(x)): the evaluated model's loss."""
    xb = torch.from_numpy(np.ascontiguousarray(x))
    yb = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return F.cross_entropy(split.server(split.client(xb)), yb)


def batch_grads(split: SplitModel, manifest: Manifest, theta: np.ndarray, x: np.ndarray,
                y: np.ndarray, batch: int) -> np.ndarray:
    """(d, m) float32: column j is ∇θ of the full model's mean loss on the j-th batch of
    (x, y) in order (the last batch may be smaller); aux rows are zero."""
    load_device(split, manifest, theta)
    owned = manifest_params(split, manifest)
    live = [p for p in owned if p is not None]
    cols = []
    with grads_for(split, live):
        for i in range(0, len(y), batch):
            for p in live:
                p.grad = None
            full_loss(split, x[i:i + batch], y[i:i + batch]).backward()
            col = np.zeros(manifest.num_params, dtype=np.float32)
            for spec, p in zip(manifest.params, owned, strict=True):
                if p is not None and p.grad is not None:
                    col[spec.offset:spec.offset + spec.size] = p.grad.numpy().ravel()
            cols.append(col)
        for p in live:
            p.grad = None
    return np.stack(cols, axis=1)


def mean_grad(split: SplitModel, manifest: Manifest, theta: np.ndarray, x: np.ndarray,
              y: np.ndarray, batch: int = 64) -> np.ndarray:
    """∇θ of the full model's mean loss over all of (x, y), flat (d,)."""
    g = batch_grads(split, manifest, theta, x, y, batch)
    sizes = np.asarray([min(batch, len(y) - i) for i in range(0, len(y), batch)], np.float32)
    return (g @ sizes / sizes.sum()).astype(np.float32)


def guide_basis(split: SplitModel, manifest: Manifest, theta: np.ndarray, x: np.ndarray,
                y: np.ndarray, k: int, batch: int) -> np.ndarray:
    """The round's guided basis: top-k directions of the guide set's batch gradients."""
    if len(y) < k * batch:
        raise ValueError(f"--guide-size {len(y)} gives {-(-len(y) // batch)} guide batches "
                         f"of {batch}, fewer than --guide-rank {k}; help: a guide set of at "
                         f"least rank x batch = {k * batch} examples")
    return orthonormal_basis(batch_grads(split, manifest, theta, x, y, batch), k)


def random_basis(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random orthonormal (d, k) basis on the coordinates `mask` marks (the
    control for a guided basis: the same rank, no information)."""
    g = rng.standard_normal((int(mask.sum()), k))
    q, _ = np.linalg.qr(g)
    out = np.zeros((mask.size, k), dtype=np.float32)
    out[mask] = q
    return out


def guide_rows(st: Setting, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`size` held-out rows (the guide set), a seeded draw no device received."""
    if st.x_dev is None or st.y_dev is None:
        raise ValueError("a guide set needs held-out rows the devices never get (SST-2: "
                         "dev.tsv next to train.tsv); help: put a dev.tsv in --data-dir")
    if size > len(st.y_dev):
        raise ValueError(f"--guide-size {size} is more than the {len(st.y_dev)} held-out "
                         "rows the run loaded")
    idx = np.random.default_rng([seed, GUIDE_KEY]).permutation(len(st.y_dev))[:size]
    return st.x_dev[idx], st.y_dev[idx]
