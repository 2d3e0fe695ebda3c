"""An ONNX graph that returns the device's aux loss and its exact gradient w.r.t. a few
device tensors (the "tail": by default the last device layer's ffn_out Linear and the
ffn_norm LayerNorm after it, the `ffnout-last1` set of `baselines/screen.py`).

Why: on MiniLM/SST-2 the screen shows backprop on these four tensors alone gains as much as
backprop on the whole device LoRA, while ZO gains nothing. ONNX Runtime has no autograd on
the device, so the gradient is computed here, once, by torch: `torch.func.grad_and_value`
over a function of the tail tensors (everything else closed over as constants), traced to
aten ops by `make_fx`, and exported by the TorchScript exporter. The result is a static
inference graph (fixed batch and length: make_fx records concrete shapes), which the device
runs like any other graph. Only the backward the tail needs is traced: through the aux head
to the cut and into the tail, not through the rest of the device.

The legacy exporter has no symbolic for a few aten ops the trace contains; `_PORTABLE`
rewrites each into public torch ops that it does export (same arithmetic).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch._decomp import get_decompositions
from torch.func import functional_call, grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx

from edge_runtime.bundle import GRAPH_DATA
from edge_runtime.manifest import INPUT_NAME, LABEL_NAME, LOSS_OUTPUT, SMASHED_OUTPUT
from exporter.export import (
    TrainGraph,
    externalize_initializers,
    legacy_export,
    train_graph,
)
from exporter.zoo import SplitModel

GRAD_PREFIX = "grad."  # output name of a tail tensor's gradient: GRAD_PREFIX + input name
TAIL_SETS = {"ffnout-last1": ("ffn_out.weight", "ffn_out.bias",
                              "ffn_norm.weight", "ffn_norm.bias")}
_A = torch.ops.aten
# Backward ops with no ONNX symbolic, decomposed by torch into ops that have one.
_DECOMPOSE = (_A.native_layer_norm_backward, _A.gelu_backward, _A._softmax_backward_data,
              _A._log_softmax_backward_data, _A.nll_loss_backward, _A.nll_loss_forward)


class TailGradError(ValueError):
    """A tail set or tensor name the split does not have."""


def tail_names(split: SplitModel, tail_set: str = "ffnout-last1") -> list[str]:
    """Graph-input names (TrainGraph parameter names) of the set's tensors on the last
    device layer."""
    if tail_set not in TAIL_SETS:
        raise TailGradError(f"unknown tail set {tail_set!r}; help: one of {sorted(TAIL_SETS)}")
    layers = getattr(split.client, "layers", None)
    if layers is None or not len(layers):
        raise TailGradError(f"{type(split.client).__name__} has no encoder layers; help: the "
                            "tail sets are defined for minilm")
    last = f"client.layers.{len(layers) - 1}."
    return [last + name for name in TAIL_SETS[tail_set]]


def tail_loss(graph: TrainGraph, names: list[str]
              ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """loss(x, y, *tail) -> (aux loss, smashed): the named tensors replaced, every other
    tensor of the graph a detached constant (so nothing else is differentiated)."""
    params = {k: v.detach() for k, v in graph.named_parameters()}
    missing = [n for n in names if n not in params]
    if missing:
        raise TailGradError(f"{missing} are not tensors of the device graph; help: names "
                            "look like 'client.layers.4.ffn_out.weight'")

    def loss(x: torch.Tensor, y: torch.Tensor,
             *tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, smashed, _ = functional_call(
            graph, {**params, **dict(zip(names, tail, strict=True))}, (x, y))
        return value, smashed

    return loss


def grad_step(graph: TrainGraph, names: list[str]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """(x, y, *tail) -> (loss, smashed, *d loss / d tail): what the exported graph
    computes; the smashed data come along because the device uploads them every k steps."""
    loss = tail_loss(graph, names)
    argnums = tuple(range(2, 2 + len(names)))

    def step(x: torch.Tensor, y: torch.Tensor, *tail: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads, (value, smashed) = grad_and_value(loss, argnums=argnums, has_aux=True)(
            x, y, *tail)
        return (value, smashed.detach(), *grads)

    return step


def _pad_to(grad: torch.Tensor, sizes: list[int], dim: int, start: int, end: int) -> torch.Tensor:
    """grad placed at [start:end] of zeros of `sizes` along `dim` (a slice's backward)."""
    dim = dim % len(sizes)
    pad = [0, 0] * (len(sizes) - 1 - dim) + [start, sizes[dim] - end]
    return F.pad(grad, pad)


def _slice_backward(grad: torch.Tensor, sizes: list[int], dim: int, start: int, end: int,
                    step: int) -> torch.Tensor:
    assert step == 1, "only unit-step slices are traced here"
    end = min(end, sizes[dim])
    return _pad_to(grad, sizes, dim, start % sizes[dim] if start < 0 else start, end)


def _select_backward(grad: torch.Tensor, sizes: list[int], dim: int, index: int) -> torch.Tensor:
    index = index % sizes[dim]
    return _pad_to(grad.unsqueeze(dim), sizes, dim, index, index + 1)


_PORTABLE: dict[Any, Callable[..., Any]] = {
    _A._to_copy.default: lambda t, dtype=None, **_: t.to(dtype),
    _A._unsafe_view.default: torch.reshape,
    _A._softmax.default: lambda t, dim, half: torch.softmax(t, dim),
    _A._log_softmax.default: lambda t, dim, half: torch.log_softmax(t, dim),
    _A.slice_backward.default: _slice_backward,
    _A.select_backward.default: _select_backward,
}


def trace_tail_grad(split: SplitModel, names: list[str], x: torch.Tensor,
                    y: torch.Tensor) -> torch.fx.GraphModule:
    """The gradient step as an FX graph of exportable torch ops, specialised to x's shape."""
    graph = train_graph(split)
    step = grad_step(graph, names)
    tail = [dict(graph.named_parameters())[n].detach().clone() for n in names]
    with torch.no_grad():  # grad_and_value ignores it; keeps the frozen params out of autograd
        gm = make_fx(step, decomposition_table=get_decompositions(list(_DECOMPOSE)))(
            x, y, *tail)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _PORTABLE:
            node.target = _PORTABLE[node.target]
    gm.recompile()
    return gm


def export_tail_grad(split: SplitModel, path: str | Path, *, batch: int, length: int | None = None,
                     tail_set: str = "ffnout-last1", opset: int = 17) -> Path:
    """Write the tail-gradient graph to `path` (+ GRAPH_DATA beside it for the frozen
    tensors, as the bundle does). Inputs: x, y, the tail tensors (named as the device graph
    names them); outputs: loss, smashed and GRAD_PREFIX + name per tail tensor. Shapes are fixed to
    (batch, *split.input_shape), with the sequence length replaced by `length` if given."""
    names = tail_names(split, tail_set)
    shape = tuple(split.input_shape)
    if length is not None:
        shape = (shape[0], length)
    x = torch.zeros(batch, *shape, dtype=torch.long)
    x[:, 1] = 1
    y = torch.zeros(batch, dtype=torch.long)
    gm = trace_tail_grad(split, names, x, y)
    tail = [dict(train_graph(split).named_parameters())[n].detach() for n in names]
    with warnings.catch_warnings():
        # The exporter's shape inference only reports that it cannot fold a strided Slice of
        # a traced constant; it changes nothing in the graph (the parity test checks values).
        warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1",
                                category=UserWarning)
        proto = legacy_export(gm, (x, y, *tail), input_names=[INPUT_NAME, LABEL_NAME, *names],
                              output_names=[LOSS_OUTPUT, SMASHED_OUTPUT,
                                            *(GRAD_PREFIX + n for n in names)],
                              dynamic_axes={}, opset=opset)
    # The frozen constants are initializers only (ORT may fold them); inputs are x, y, tail.
    keep = [i for i in proto.graph.input if i.name in {INPUT_NAME, LABEL_NAME, *names}]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data, _ = externalize_initializers(proto)
    if data is not None:
        (path.parent / GRAPH_DATA).write_bytes(data)
    onnx.save(proto, str(path))
    return path
