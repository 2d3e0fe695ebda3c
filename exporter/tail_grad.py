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
from typing import Any, NamedTuple

import onnx
import torch
import torch.nn.functional as F
from torch._decomp import get_decompositions
from torch.func import functional_call, grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx

from edge_runtime.bundle import GRAPH_DATA
from edge_runtime.manifest import (
    GRAD_PREFIX,
    INPUT_NAME,
    LABEL_NAME,
    LOSS_OUTPUT,
    SMASHED_OUTPUT,
)
from exporter.export import (
    TrainGraph,
    externalize_initializers,
    legacy_export,
    train_graph,
    trainable_params,
)
from exporter.zoo import SplitModel

# A tail set names tensors of the last device layer (minilm) or the last device convolution
# (the CNNs); `tail_names` resolves it on a split.
TAIL_SETS = {"ffnout-last1": ("ffn_out.weight", "ffn_out.bias",
                              "ffn_norm.weight", "ffn_norm.bias"),
             "last-conv": ("weight", "bias")}
_A = torch.ops.aten
# Backward ops with no ONNX symbolic, decomposed by torch into ops that have one.
_DECOMPOSE = (_A.native_layer_norm_backward, _A.gelu_backward, _A._softmax_backward_data,
              _A._log_softmax_backward_data, _A.nll_loss_backward, _A.nll_loss_forward,
              _A.threshold_backward, _A.max_pool2d_with_indices_backward,
              _A.native_group_norm_backward, _A.native_group_norm,
              _A._adaptive_avg_pool2d_backward)


class TailGraph(NamedTuple):
    """A bundle's tail graph before it is written (`edge_runtime.manifest.TailSpec`)."""

    proto: onnx.ModelProto
    tail_set: str
    trained: tuple[str, ...]
    batch: int


class TailGradError(ValueError):
    """A tail set or tensor name the split does not have."""


def default_tail_set(split: SplitModel) -> str:
    """`ffnout-last1` for an encoder (minilm), `last-conv` for the CNNs."""
    return "ffnout-last1" if getattr(split.client, "layers", None) is not None else "last-conv"


def tail_names(split: SplitModel, tail_set: str | None = None) -> list[str]:
    """Graph-input names (TrainGraph parameter names) of the set's tensors: on the last
    encoder layer (`ffnout-last1`), or the last Conv2d of the client (`last-conv`; a conv
    without bias contributes its weight alone)."""
    tail_set = default_tail_set(split) if tail_set is None else tail_set
    if tail_set not in TAIL_SETS:
        raise TailGradError(f"unknown tail set {tail_set!r}; help: one of {sorted(TAIL_SETS)}")
    if tail_set == "last-conv":
        convs = [n for n, m in split.client.named_modules() if isinstance(m, torch.nn.Conv2d)]
        if not convs:
            raise TailGradError(f"{type(split.client).__name__} has no convolution; help: "
                                "the last-conv set is defined for the CNNs")
        own = dict(split.client.get_submodule(convs[-1]).named_parameters())
        return [f"client.{convs[-1]}.{n}" for n in TAIL_SETS[tail_set] if n in own]
    layers = getattr(split.client, "layers", None)
    if layers is None or not len(layers):
        raise TailGradError(f"{type(split.client).__name__} has no encoder layers; help: the "
                            "ffnout-last1 set is defined for minilm, last-conv for the CNNs")
    last = f"client.layers.{len(layers) - 1}."
    return [last + name for name in TAIL_SETS[tail_set]]


def mark_tail_trainable(split: SplitModel, tail_set: str | None = None) -> list[str]:
    """Make the tail tensors trainable parameters of the split, so that the bundle carries
    them in its flat weight vector (graph inputs, aggregated by the server like LoRA).
    minilm's base weights are frozen otherwise; a CNN's already are trainable."""
    names = tail_names(split, tail_set)
    params = dict(train_graph(split).named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    return names


def tail_loss(graph: TrainGraph, names: list[str]
              ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """loss(x, y, *inputs) -> (aux loss, smashed): the named tensors replaced, every other
    tensor of the graph a detached constant (so nothing else is differentiated)."""
    params = {k: v.detach() for k, v in graph.named_parameters()}
    missing = [n for n in names if n not in params]
    if missing:
        raise TailGradError(f"{missing} are not tensors of the device graph; help: names "
                            "look like 'client.layers.4.ffn_out.weight'")

    def loss(x: torch.Tensor, y: torch.Tensor,
             *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, smashed, _ = functional_call(
            graph, {**params, **dict(zip(names, inputs, strict=True))}, (x, y))
        return value, smashed

    return loss


def grad_step(graph: TrainGraph, names: list[str], trained: list[str] | None = None
              ) -> Callable[..., tuple[torch.Tensor, ...]]:
    """(x, y, *inputs) -> (loss, smashed, *d loss / d trained): what the exported graph
    computes, with `names` its weight inputs and `trained` (default: all of them) those it
    differentiates; the smashed data come along because the device uploads them every k
    steps."""
    trained = list(names) if trained is None else trained
    unknown = [n for n in trained if n not in names]
    if unknown:
        raise TailGradError(f"trained tensors {unknown} are not inputs of the graph")
    loss = tail_loss(graph, names)
    argnums = tuple(2 + names.index(n) for n in trained)

    def step(x: torch.Tensor, y: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads, (value, smashed) = grad_and_value(loss, argnums=argnums, has_aux=True)(
            x, y, *inputs)
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


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bias_sizes: list[int] | None, stride: list[int], padding: list[int],
                   dilation: list[int], transposed: bool, output_padding: list[int],
                   groups: int, mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    """aten.convolution_backward of a plain 2-d convolution as forward convolutions, which
    the exporter has symbols for: the weight gradient is the convolution of the input with
    the output gradient as filter (batch as channels, stride and dilation swapped), cropped
    to the kernel; the input gradient is the transposed convolution of the output gradient."""
    assert not transposed and groups == 1 and grad.dim() == 4, "plain 2-d convolutions only"
    k = weight.shape[2:]
    grad_x = grad_w = grad_b = None
    if mask[0]:
        extra = [x.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                   + dilation[i] * (k[i] - 1) + 1) for i in range(2)]
        grad_x = F.conv_transpose2d(grad, weight, stride=stride, padding=padding,
                                    output_padding=extra, dilation=dilation)
    if mask[1]:
        full = F.conv2d(x.transpose(0, 1), grad.transpose(0, 1), stride=dilation,
                        padding=padding, dilation=stride)
        grad_w = full.transpose(0, 1)[:, :, :k[0], :k[1]]
    if mask[2]:
        grad_b = grad.sum(dim=(0, 2, 3))
    return grad_x, grad_w, grad_b


def _squeeze_dims(t: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """squeeze over several dims (group norm's decomposition) as one squeeze per dim: the
    exporter's squeeze takes a single constant dim."""
    for d in sorted((d % t.dim() for d in dims), reverse=True):
        t = t.squeeze(d)
    return t


_PORTABLE: dict[Any, Callable[..., Any]] = {
    _A.squeeze.dims: _squeeze_dims,
    _A.convolution_backward.default: _conv_backward,
    _A._to_copy.default: lambda t, dtype=None, **_: t.to(dtype),
    _A._unsafe_view.default: torch.reshape,
    _A._softmax.default: lambda t, dim, half: torch.softmax(t, dim),
    _A._log_softmax.default: lambda t, dim, half: torch.log_softmax(t, dim),
    _A.slice_backward.default: _slice_backward,
    _A.select_backward.default: _select_backward,
}


def trace_tail_grad(split: SplitModel, names: list[str], x: torch.Tensor, y: torch.Tensor,
                    trained: list[str] | None = None) -> torch.fx.GraphModule:
    """The gradient step as an FX graph of exportable torch ops, specialised to x's shape."""
    graph = train_graph(split)
    step = grad_step(graph, names, trained)
    inputs = [dict(graph.named_parameters())[n].detach().clone() for n in names]
    with torch.no_grad():  # grad_and_value ignores it; keeps the frozen params out of autograd
        gm = make_fx(step, decomposition_table=get_decompositions(list(_DECOMPOSE)))(
            x, y, *inputs)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _PORTABLE:
            node.target = _PORTABLE[node.target]
    gm.recompile()
    return gm


def _dummy_batch(split: SplitModel, batch: int, length: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    shape = tuple(split.input_shape)
    if length is not None:
        shape = (shape[0], length)
    if split.input_dtype == "int64":  # token ids 0 and an all-ones attention mask
        x = torch.zeros(batch, *shape, dtype=torch.long)
        x[:, 1] = 1
    else:
        x = torch.zeros(batch, *shape)
    return x, torch.zeros(batch, dtype=torch.long)


def tail_proto(split: SplitModel, names: list[str], trained: list[str], *, batch: int,
               length: int | None = None, opset: int = 17) -> onnx.ModelProto:
    """The gradient graph as an ONNX model, its frozen tensors still inline. Inputs: x, y,
    `names` (as the device graph names them); outputs: loss, smashed and GRAD_PREFIX + name
    per `trained` tensor. Shapes are fixed to (batch, *split.input_shape), with the
    sequence length replaced by `length` if given."""
    if batch < 1:
        raise TailGradError(f"the tail graph's batch must be >= 1, got {batch}")
    x, y = _dummy_batch(split, batch, length)
    gm = trace_tail_grad(split, names, x, y, trained)
    values = [dict(train_graph(split).named_parameters())[n].detach() for n in names]
    with warnings.catch_warnings():
        # The exporter's shape inference only reports that it cannot fold a strided Slice of
        # a traced constant; it changes nothing in the graph (the parity test checks values).
        warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1",
                                category=UserWarning)
        proto = legacy_export(gm, (x, y, *values), input_names=[INPUT_NAME, LABEL_NAME, *names],
                              output_names=[LOSS_OUTPUT, SMASHED_OUTPUT,
                                            *(GRAD_PREFIX + n for n in trained)],
                              dynamic_axes={}, opset=opset)
    # The frozen constants are initializers only (ORT may fold them); inputs are x, y, names.
    keep = [i for i in proto.graph.input if i.name in {INPUT_NAME, LABEL_NAME, *names}]
    if [i.name for i in keep] != [INPUT_NAME, LABEL_NAME, *names]:
        raise TailGradError(f"the exported tail graph has inputs {[i.name for i in keep]}, "
                            f"expected x, y and {names}; help: every input must be used")
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    return proto


def export_tail_grad(split: SplitModel, path: str | Path, *, batch: int, length: int | None = None,
                     tail_set: str | None = None, opset: int = 17) -> Path:
    """Write the graph of the tail tensors alone to `path` (+ GRAPH_DATA beside it for the
    frozen tensors, as the bundle does): inputs x, y and the tail, outputs loss, smashed and
    the tail's gradients (`tail_proto`). The bundle's own tail graph is `bundle_tail_graph`."""
    names = tail_names(split, tail_set)
    proto = tail_proto(split, names, names, batch=batch, length=length, opset=opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data, _ = externalize_initializers(proto)
    if data is not None:
        (path.parent / GRAPH_DATA).write_bytes(data)
    onnx.save(proto, str(path))
    return path


def trained_names(split: SplitModel, tail_set: str | None = None) -> list[str]:
    """What a `heron-tail` device trains, in the bundle's param order: the tail tensors and
    the aux head's trainable tensors (the aux loss's own head; everything else is frozen)."""
    tail = set(tail_names(split, tail_set))
    return [n for n, _, role in trainable_params(train_graph(split))
            if n in tail or role == "aux"]


def bundle_tail_graph(split: SplitModel, *, batch: int, tail_set: str | None = None,
                      opset: int = 17) -> TailGraph:
    """The bundle's tail graph: inputs x, y and *every* trainable tensor of the bundle (the
    device feeds its flat weights as it does to the training graph, so no trainable value is
    baked in), gradients for `trained_names`. The tail must already be trainable in the split
    (`mark_tail_trainable`), so that it is in the bundle's weights."""
    tail_set = default_tail_set(split) if tail_set is None else tail_set
    names = [n for n, _, _ in trainable_params(train_graph(split))]
    frozen = [n for n in tail_names(split, tail_set) if n not in names]
    if frozen:
        raise TailGradError(f"tail tensors {frozen} are frozen in the split; help: call "
                            "mark_tail_trainable before exporting the bundle")
    trained = trained_names(split, tail_set)
    proto = tail_proto(split, names, trained, batch=batch, opset=opset)
    return TailGraph(proto, tail_set, tuple(trained), batch)
