"""The `heron-tail` device step: the bundle's tail-gradient graph (`manifest.TailSpec`) in
ONNX Runtime, and numpy Adam/SGD on the tensors it differentiates.

Why a graph and not autograd: the device has no torch. The exporter traced the aux loss's
gradient w.r.t. the last device map and the aux head into a plain inference graph, so one
session run gives loss, smashed data and exact gradients (`exporter.tail_grad`). Everything
else the device holds is frozen in this mode: the gradient stops at the tail, which is what
makes it cheap (one forward plus the tail's backward), and LoRA stays where the bundle put it.

The graph's shapes are static (make_fx records them), so every step feeds exactly
`TailSpec.batch` samples: a short batch (the end of an epoch, or a shard smaller than the
batch) is padded by repeating its own samples from the start (`fixed_batch`), and only its
real samples go to the server as smashed data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from edge_runtime.bundle import Bundle
from edge_runtime.manifest import (
    GRAD_PREFIX,
    INPUT_NAME,
    LABEL_NAME,
    LOSS_OUTPUT,
    SMASHED_OUTPUT,
    BundleError,
    TailSpec,
)


def fixed_batch(idx: np.ndarray, batch: int) -> np.ndarray:
    """`idx` cycled to exactly `batch` entries (a full batch comes back unchanged)."""
    if idx.size == 0:
        raise ValueError("an empty batch cannot be padded")
    return idx if idx.size == batch else np.resize(idx, batch)


class TailModel:
    """An ONNX Runtime session over the bundle's tail graph, checked against the manifest
    before any step: inputs x, y and every param, outputs loss, smashed and one gradient
    per trained param, with the manifest's shapes."""

    def __init__(self, bundle: Bundle, opts: ort.SessionOptions,
                 open_session: Callable[[bytes, ort.SessionOptions], ort.InferenceSession]
                 ) -> None:
        m = bundle.manifest
        if m.tail is None or bundle.tail is None:
            raise BundleError("the bundle has no tail-gradient graph, which heron-tail needs; "
                              "help: the server exports one for --algorithm heron-tail")
        self.spec: TailSpec = m.tail
        self.bundle = bundle
        try:
            self.session = open_session(bundle.tail, opts)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"ONNX Runtime cannot load the tail graph: {exc}") from exc
        shapes = {p.name: list(p.shape) for p in m.params}
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        want = {INPUT_NAME: [self.spec.batch, *m.input_shape], LABEL_NAME: [self.spec.batch],
                **shapes}
        if inputs != want:
            raise BundleError(f"tail graph inputs {sorted(inputs)} do not match the manifest "
                              f"(x, y at batch {self.spec.batch} and its {len(m.params)} params)")
        self.grad_names = [GRAD_PREFIX + n for n in self.spec.trained]
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        missing = [n for n in (LOSS_OUTPUT, SMASHED_OUTPUT, *self.grad_names) if n not in outputs]
        if missing:
            raise BundleError(f"tail graph lacks outputs {missing[:3]}")
        bad = [n for n, g in zip(self.spec.trained, self.grad_names, strict=True)
               if outputs[g] != shapes[n]]
        if bad:
            raise BundleError(f"tail graph gradients of {bad[:3]} do not have their params' "
                              "shapes")
        self.outputs = [LOSS_OUTPUT, SMASHED_OUTPUT, *self.grad_names]
        # where each trained param lies in the flat weight vector
        offsets = {p.name: (p.offset, p.size) for p in m.params}
        self.slices = [slice(offsets[n][0], offsets[n][0] + offsets[n][1])
                       for n in self.spec.trained]

    @property
    def batch(self) -> int:
        return self.spec.batch

    def gather(self, theta: np.ndarray) -> np.ndarray:
        """The trained params of `theta`, back to back (a copy)."""
        return np.concatenate([theta[s] for s in self.slices])

    def scatter(self, theta: np.ndarray, trained: np.ndarray) -> None:
        """Write the trained params back into `theta`, in place."""
        at = 0
        for s in self.slices:
            n = s.stop - s.start
            theta[s] = trained[at:at + n]
            at += n

    def step(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray
             ) -> tuple[float, np.ndarray, np.ndarray]:
        """(aux loss, smashed, the trained params' gradient back to back) at θ on one batch
        of exactly `batch` samples."""
        if len(y) != self.spec.batch:
            raise ValueError(f"the tail graph takes batches of {self.spec.batch}, got {len(y)}")
        feeds = {INPUT_NAME: x, LABEL_NAME: y, **self.bundle.unflatten(theta)}
        loss, smashed, *grads = self.session.run(self.outputs, feeds)
        return float(loss), smashed, np.concatenate([g.ravel() for g in grads])
