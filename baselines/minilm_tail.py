"""A minilm split from one encoder layer on, the layers below it cached: the forward to the
evaluated logits, server(client(x)), and gradients on the device tensors above the cut.

The screen and the race train or probe only the last layers; running them from cached
hidden states is what makes that cheap. Torch, through the server's copy of the split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines import guide


def device_layers(split: Any) -> nn.ModuleList:
    """The device's encoder layers; a ValueError for a split that is not minilm's."""
    layers = getattr(split.client, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(split.client, "embeddings"):
        raise ValueError("the screen needs a minilm split (client.embeddings + layers); "
                         f"got {split.model}")
    return layers


def _add_mask(mask: torch.Tensor) -> torch.Tensor:
    return (1.0 - mask.to(torch.float32))[:, None, None, :] * torch.finfo(torch.float32).min


def prefix(split: Any, x: np.ndarray, start: int) -> torch.Tensor:
    """Hidden states entering layer `start` (-1: the raw token ids), no grad."""
    xt = torch.from_numpy(np.ascontiguousarray(x))
    if start < 0:
        return xt
    out = []
    with torch.no_grad():
        for i in range(0, len(xt), 128):
            xb = xt[i:i + 128]
            ids, mask = xb[:, 0], xb[:, 1]
            h = split.client.embeddings(ids)
            for layer in device_layers(split)[:start]:
                h = layer(h, _add_mask(mask))
            out.append(h)
    return torch.cat(out)


def tail_logits(split: Any, start: int, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """server(client(x)) from layer `start`'s input h (start -1: h are the token ids)."""
    if start < 0:
        return split.server(split.client(h))
    add = _add_mask(mask)
    for layer in device_layers(split)[start:]:
        h = layer(h, add)
    return split.server(torch.cat([h, mask.to(h.dtype).unsqueeze(-1)], dim=-1))


def tail_grads(split: Any, manifest: Any, theta: np.ndarray, start: int, h: torch.Tensor,
               mask: torch.Tensor, y: np.ndarray, lo: int, hi: int, batch: int) -> np.ndarray:
    """(hi - lo, m): the full loss's gradient on θ[lo:hi] (client tensors of layers >=
    `start`) for each batch of the cached inputs h (the guide set's, for a guide basis)."""
    guide.load_device(split, manifest, theta)
    owned = guide.manifest_params(split, manifest)
    tensors = [(spec, p) for spec, p in zip(manifest.params, owned, strict=True)
               if p is not None and lo <= spec.offset < hi]
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    cols = []
    with guide.grads_for(split, [p for _, p in tensors]):
        for i in range(0, len(yt), batch):
            for _, p in tensors:
                p.grad = None
            logits = tail_logits(split, start, h[i:i + batch], mask[i:i + batch])
            F.cross_entropy(logits, yt[i:i + batch]).backward()
            col = np.zeros(hi - lo, dtype=np.float32)
            for spec, p in tensors:
                if p.grad is not None:
                    col[spec.offset - lo:spec.offset - lo + spec.size] = p.grad.numpy().ravel()
            cols.append(col)
        for _, p in tensors:
            p.grad = None
    return np.stack(cols, axis=1)
