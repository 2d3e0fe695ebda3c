"""Export the device graph a second time, as a chain of segments, for block-wise ZO.

A block-wise ZO step perturbs the weights of one block only, so everything before that
block computes the same activations as the unperturbed pass. With the graph cut into
segments at block boundaries, the device caches each segment's input during the
unperturbed pass and re-runs only from the perturbed block on (`edge_runtime.blockzo`).

Segments follow the client's named blocks (``stem``, ``layer1`` …); a block that is itself a
Sequential of composite modules (ResNet's ``layer1``: two BasicBlocks) is split one level
deeper (``layer1.0``, ``layer1.1``), since a block's re-run cost is what a step saves. The
last segment is the aux head with the cross-entropy loss. Trainable parameters are graph
inputs under the same names as in the full training graph, so a segment's feed is a slice
of the same flat weight vector.

Each segment with convolutions is also written as an NCHWc variant. ONNX Runtime runs
convolutions fastest in its blocked NCHWc layout, but its graph optimizer only converts a
Conv whose filter is a constant, since it reorders the filter once at load time; with the
filter a graph input (as ZO needs) the Conv stays on the slower NCHW path. The variant does
that conversion in the graph itself (ReorderInput, com.microsoft.nchwc Conv, ReorderOutput,
as the optimizer would) and leaves the filter an input: the device feeds it pre-reordered
for its CPU's block size (layouts in the model metadata, ``NCHWC_LAYOUTS``).
"""

from __future__ import annotations

import json

import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from edge_runtime.manifest import (
    LABEL_NAME,
    LOSS_OUTPUT,
    NCHWC_DOMAIN,
    NCHWC_LAYOUTS,
    SEGMENT_INPUT,
    SEGMENT_OUTPUT,
    SegmentGraphs,
)
from exporter.zoo import SplitModel

_EXPORT_BATCH = 2  # >1 so the tracer cannot specialise any op on a singleton batch
_BODY = "body."  # parameter prefix inside the exported wrapper


class _SegmentGraph(nn.Module):
    """One block (or the aux head plus the loss) as a standalone graph."""

    def __init__(self, body: nn.Module, with_loss: bool) -> None:
        super().__init__()
        self.body = body
        self.with_loss = with_loss

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.body(h)
        return F.cross_entropy(out, y) if self.with_loss else out


def segment_blocks(split: SplitModel) -> list[tuple[str, nn.Module]] | None:
    """The client's blocks in chain order; None when the client is not a chain of blocks."""
    if split.model == "minilm":
        from exporter.minilm import client_segments

        return client_segments(split.client)  # type: ignore[arg-type]
    if not isinstance(split.client, nn.Sequential) or split.input_dtype != "float32":
        return None
    blocks: list[tuple[str, nn.Module]] = []
    for name, block in split.client.named_children():
        children = list(block.named_children()) if isinstance(block, nn.Sequential) else []
        if children and all(any(True for _ in child.children()) for _, child in children):
            blocks += [(f"{name}.{child_name}", child) for child_name, child in children]
        else:
            blocks.append((name, block))
    return blocks


def export_segments(split: SplitModel, names: list[str], opset: int
                    ) -> list[SegmentGraphs] | None:
    """The segment graphs (and their NCHWc variants), for `write_bundle(segments=...)`.

    `names` are the bundle's trainable parameter names in manifest order; each segment must
    own a contiguous run of them. None when the model is not a chain (no segments shipped).
    """
    blocks = segment_blocks(split)
    if blocks is None:
        return None
    from exporter.export import _dummy_input  # export imports this module

    chain = [(name, block, False) for name, block in blocks]
    chain.append(("aux", split.aux, True))
    # a segment's parameters by identity: a block may wrap the client's modules (minilm)
    bundle_names = {id(p): f"{role}.{n}" for role, module in (("client", split.client),
                                                             ("aux", split.aux))
                    for n, p in module.named_parameters()}
    trainable = set(names)
    out: list[SegmentGraphs] = []
    h = _dummy_input(split)
    y = torch.zeros(_EXPORT_BATCH, dtype=torch.long)
    index = 0
    for name, block, with_loss in chain:
        rename = {_BODY + n: bundle_names[id(p)] for n, p in block.named_parameters()
                  if bundle_names.get(id(p)) in trainable}
        owned = list(rename.values())
        if names[index:index + len(owned)] != owned:
            raise RuntimeError(f"segment {name!r} does not own a contiguous run of the "
                               "trainable parameters; help: register blocks in chain order")
        graph = _SegmentGraph(block, with_loss)
        proto = _export(graph, h, y if with_loss else None, opset)
        _params_to_inputs(proto, rename)
        onnx.checker.check_model(proto, full_check=True)
        out.append(SegmentGraphs(name, proto.SerializeToString(), len(owned),
                                 _nchwc_variant(proto)))
        index += len(owned)
        if not with_loss:
            with torch.no_grad():
                h = block(h)
    if index != len(names):
        raise RuntimeError(f"segments own {index} of {len(names)} trainable parameters")
    return out


def _export(graph: _SegmentGraph, h: torch.Tensor, y: torch.Tensor | None,
            opset: int) -> onnx.ModelProto:
    """Same exporter settings as the full training graph (see exporter.export)."""
    batch = {0: "batch"}
    args: tuple[torch.Tensor, ...] = (h,) if y is None else (h, y)
    inputs = [SEGMENT_INPUT] if y is None else [SEGMENT_INPUT, LABEL_NAME]
    output = SEGMENT_OUTPUT if y is None else LOSS_OUTPUT
    axes = {name: batch for name in inputs}
    if y is None:
        axes[output] = batch
    from exporter.export import legacy_export  # export imports this module

    return legacy_export(graph, args, input_names=inputs, output_names=[output],
                         dynamic_axes=axes, opset=opset)


def _params_to_inputs(proto: onnx.ModelProto, rename: dict[str, str]) -> None:
    """Rename the trainable initializers to their bundle names and make them graph inputs
    (in `rename` order, after the data inputs); frozen tensors stay initializers."""
    inits = {init.name: init for init in proto.graph.initializer}
    missing = [n for n in rename if n not in inits]
    if missing:
        raise RuntimeError(f"segment parameters {missing[:5]} are not initializers of the "
                           "exported graph; help: every trainable parameter must be used")
    data_inputs = [i for i in proto.graph.input if i.name not in inits]
    weight_inputs = []
    for old, new in rename.items():
        init = inits[old]
        if init.data_type != TensorProto.FLOAT:
            raise RuntimeError(f"trainable parameter {new!r} exported as a non-FLOAT tensor")
        weight_inputs.append(helper.make_tensor_value_info(new, TensorProto.FLOAT,
                                                           list(init.dims)))
    for node in proto.graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
    keep = [init for init in proto.graph.initializer if init.name not in rename]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    del proto.graph.input[:]
    proto.graph.input.extend([*data_inputs, *weight_inputs])


def _nchwc_variant(proto: onnx.ModelProto) -> bytes | None:
    """The segment with every eligible Conv in NCHWc layout, filters still graph inputs.

    Eligible: 2-D, one group, a filter that is a graph input with output channels a
    multiple of 16 (every block size ONNX Runtime uses divides them, so no padding) and
    input channels a multiple of 16 (blocked input) or below 4 (the NCHW-input kernel).
    None when no Conv qualifies.
    """
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in proto.graph.input}
    layouts: dict[str, str] = {}
    nodes = []
    for node in proto.graph.node:
        dims = shapes.get(node.input[1]) if node.op_type == "Conv" else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (dims is None or len(dims) != 4 or attrs.get("group", 1) != 1
                or dims[0] % 16 or not (dims[1] % 16 == 0 or dims[1] < 4)):
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        if dims[1] % 16 == 0:
            nodes.append(helper.make_node("ReorderInput", [x], [x + "/nchwc"],
                                          domain=NCHWC_DOMAIN))
            x = x + "/nchwc"
        nodes.append(helper.make_node("Conv", [x, *node.input[1:]], [y + "/nchwc"],
                                      domain=NCHWC_DOMAIN, **attrs))
        nodes.append(helper.make_node("ReorderOutput", [y + "/nchwc"], [y], domain=NCHWC_DOMAIN,
                                      channels=dims[0]))
        layouts[node.input[1]] = "OIHWBiBo" if dims[1] % 16 == 0 else "OIHWBo"
    if not layouts:
        return None
    variant = onnx.ModelProto()
    variant.CopyFrom(proto)
    del variant.graph.node[:]
    variant.graph.node.extend(nodes)
    variant.opset_import.append(helper.make_opsetid(NCHWC_DOMAIN, 1))
    helper.set_model_props(variant, {NCHWC_LAYOUTS: json.dumps(layouts)})
    return variant.SerializeToString()
