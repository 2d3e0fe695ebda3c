"""Export a split model's device side (client + aux head + loss) as an ONNX training bundle.

The graph computes (loss, smashed, logits) from (x, y, weights). Trainable parameters are
moved from initializers to graph inputs so a device can feed perturbed weights to one
ONNX Runtime session per zeroth-order step; frozen tensors stay baked in as initializers.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from edge_runtime.bundle import GRAPH_DATA, write_bundle
from edge_runtime.manifest import (
    INPUT_NAME,
    LABEL_NAME,
    LOGITS_OUTPUT,
    LOSS_OUTPUT,
    SMASHED_OUTPUT,
    Manifest,
)
from exporter.segments import export_segments
from exporter.zoo import SplitModel, build_split

ROLE_PREFIXES = {"client": "client.", "aux": "aux."}
# Frozen initializers go to external data (GRAPH_DATA, memory-mapped by the device) when
# together they are at least this large: minilm's 47 MB embedding table, not a CNN's few KB.
EXTERNAL_DATA_MIN_BYTES = 1 << 20
_EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors (shapes, scalars) stay in the graph
_EXTERNAL_ALIGN = 4096  # page-aligned offsets: each tensor maps on its own pages
_DataIndex = dict[bytes, tuple[int, int]]  # sha256 of a tensor's bytes -> (offset, length)
_EXPORT_BATCH = 2  # >1 so the tracer cannot specialise any op on a singleton batch


class TrainGraph(nn.Module):
    """What the device runs: client sub-model, aux head and mean cross-entropy."""

    def __init__(self, client: nn.Module, aux: nn.Module) -> None:
        super().__init__()
        self.client = client  # registered first: its params come first in the flat vector
        self.aux = aux

    def forward(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        smashed = self.client(x)
        logits = self.aux(smashed)
        return F.cross_entropy(logits, y), smashed, logits


def train_graph(split: SplitModel) -> TrainGraph:
    """The torch twin of the exported graph; it shares (not copies) the split's modules."""
    return TrainGraph(split.client, split.aux)


def trainable_params(graph: TrainGraph) -> list[tuple[str, torch.Tensor, str]]:
    """(graph input name, tensor, role) for every trainable tensor, in module order."""
    out = []
    for name, param in graph.named_parameters():
        if param.requires_grad:
            role = "client" if name.startswith(ROLE_PREFIXES["client"]) else "aux"
            out.append((name, param, role))
    return out


def _dummy_input(split: SplitModel) -> torch.Tensor:
    if split.input_dtype == "int64":  # token ids 0 and an all-ones attention mask
        x = torch.zeros(_EXPORT_BATCH, *split.input_shape, dtype=torch.long)
        x[:, 1] = 1
        return x
    return torch.zeros(_EXPORT_BATCH, *split.input_shape)


def legacy_export(module: nn.Module, args: tuple[torch.Tensor, ...], *, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict[str, dict[int, str]],
                  opset: int) -> onnx.ModelProto:
    """torch.onnx.export as every heron graph needs it (the bundle and its segments)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # dynamo=False is deliberate: the legacy TorchScript exporter keeps parameter names
        # as initializer names, which become the graph input names the bundle relies on.
        # torch warns that the legacy path is deprecated; that is expected, not actionable.
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed",
                                category=DeprecationWarning, module=r"torch\.onnx")
        # F.group_norm checks "more than one value per group" on traced sizes; the check only
        # decides whether to raise, it adds nothing to the graph. Batch-size specialisation
        # would still show up in the parity tests, which run two batch sizes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                module=r"torch\.nn\.functional")
        torch.onnx.export(
            module, args, buf, dynamo=False, input_names=input_names,
            output_names=output_names, dynamic_axes=dynamic_axes,
            # No folding, and initializers kept as inputs: with False the exporter
            # deduplicates initializers by *value*, merging e.g. all GroupNorm weights (all
            # ones at init) into one tensor, and trainable names vanish from the graph.
            do_constant_folding=False, keep_initializers_as_inputs=True, opset_version=opset,
        )
    return onnx.load_from_string(buf.getvalue())


def _torch_to_onnx(graph: TrainGraph, split: SplitModel, opset: int) -> onnx.ModelProto:
    x = _dummy_input(split)
    y = torch.zeros(_EXPORT_BATCH, dtype=torch.long)
    batch = {0: "batch"}
    return legacy_export(graph, (x, y), input_names=[INPUT_NAME, LABEL_NAME],
                         output_names=[LOSS_OUTPUT, SMASHED_OUTPUT, LOGITS_OUTPUT],
                         dynamic_axes={INPUT_NAME: batch, LABEL_NAME: batch,
                                       SMASHED_OUTPUT: batch, LOGITS_OUTPUT: batch},
                         opset=opset)


def _weights_to_inputs(proto: onnx.ModelProto, names: list[str]) -> None:
    """Make the named initializers graph inputs (float32, static shape), in `names` order.

    Every other tensor stays an initializer only (frozen: baked into the graph).
    """
    inits = {init.name: init for init in proto.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise RuntimeError(
            f"trainable parameters {missing[:5]} ({len(missing)} missing) are not initializers "
            "of the exported graph; the exporter renamed, folded or dropped them. help: make "
            "sure every trainable parameter is used in forward, and export with "
            "do_constant_folding=False and keep_initializers_as_inputs=True")
    data_inputs = [i for i in proto.graph.input if i.name not in inits]
    if [i.name for i in data_inputs] != [INPUT_NAME, LABEL_NAME]:
        raise RuntimeError(f"exported graph has data inputs {[i.name for i in data_inputs]}, "
                           f"expected {[INPUT_NAME, LABEL_NAME]}")
    weight_inputs = []
    for name in names:
        init = inits[name]
        if init.data_type != TensorProto.FLOAT:
            raise RuntimeError(f"trainable parameter {name!r} exported as dtype "
                               f"{TensorProto.DataType.Name(init.data_type)}, not FLOAT")
        weight_inputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, list(init.dims)))
    trainable = set(names)
    keep = [init for init in proto.graph.initializer if init.name not in trainable]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    del proto.graph.input[:]
    proto.graph.input.extend([*data_inputs, *weight_inputs])


def externalize_initializers(proto: onnx.ModelProto) -> tuple[bytes | None, _DataIndex]:
    """Move the graph's large initializers into GRAPH_DATA bytes (ONNX external data,
    page-aligned) and point the graph at them; (None, {}) and the graph untouched if they
    are small. The index finds a tensor's (offset, length) by its bytes' sha256."""
    big = [t for t in proto.graph.initializer
           if t.data_location != TensorProto.EXTERNAL
           and len(t.raw_data) >= _EXTERNAL_TENSOR_MIN_BYTES]
    if sum(len(t.raw_data) for t in big) < EXTERNAL_DATA_MIN_BYTES:
        return None, {}
    data = bytearray()
    index: _DataIndex = {}
    for tensor in big:
        key = hashlib.sha256(tensor.raw_data).digest()
        if key not in index:
            data += bytes(-len(data) % _EXTERNAL_ALIGN)
            index[key] = (len(data), len(tensor.raw_data))
            data += tensor.raw_data
        _point_at(tensor, *index[key])
    return bytes(data), index


def _point_at(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", GRAPH_DATA), ("offset", str(offset)),
                       ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def share_graph_data(graph: bytes, index: _DataIndex) -> bytes:
    """A segment graph whose frozen tensors also lie in GRAPH_DATA, pointed at them there:
    the segments and the training graph then map the same file pages, not two copies."""
    proto = onnx.load_from_string(graph)
    for tensor in proto.graph.initializer:
        if len(tensor.raw_data) >= _EXTERNAL_TENSOR_MIN_BYTES:
            where = index.get(hashlib.sha256(tensor.raw_data).digest())
            if where is not None:
                _point_at(tensor, *where)
    return proto.SerializeToString()


def export_bundle(split: SplitModel, out_dir: str | Path, *, opset: int = 17,
                  tail_batch: int | None = None) -> Manifest:
    """Write the device bundle for `split` into `out_dir`.

    `tail_batch`: also the tail-gradient graph for that fixed batch (`heron-tail`; the split's
    tail tensors must be trainable, `exporter.tail_grad.mark_tail_trainable`). Its frozen
    tensors point into the training graph's GRAPH_DATA, so they are not shipped twice. Such a
    bundle has no segment chain: the device never runs block-wise ZO in that mode."""
    graph = train_graph(split)
    params = trainable_params(graph)
    names = [name for name, _, _ in params]
    proto = _torch_to_onnx(graph, split, opset)
    _weights_to_inputs(proto, names)
    onnx.checker.check_model(proto, full_check=True)
    graph_data, index = externalize_initializers(proto)
    tail = None
    if tail_batch is not None:
        from exporter.tail_grad import bundle_tail_graph  # it builds on this module

        made = bundle_tail_graph(split, batch=tail_batch, opset=opset)
        tail_bytes = made.proto.SerializeToString()
        tail = (share_graph_data(tail_bytes, index) if index else tail_bytes,
                made.tail_set, made.trained, made.batch)
    segments = [] if tail is not None else export_segments(split, names, opset)  # block ZO
    if segments and index:
        segments = [seg._replace(graph=share_graph_data(seg.graph, index),
                                 nchwc=None if seg.nchwc is None
                                 else share_graph_data(seg.nchwc, index)) for seg in segments]
    return write_bundle(
        out_dir,
        onnx_bytes=proto.SerializeToString(),
        graph_data=graph_data,
        params=[(n, p.detach().cpu().numpy().astype(np.float32), r) for n, p, r in params],
        model=split.model, cut=split.cut, input_shape=split.input_shape,
        num_classes=split.num_classes, smashed_shape=split.smashed_shape, opset=opset,
        extra={"aux": split.aux_kind, "torch": str(torch.__version__), "exported_by": "heron",
               **({"options": split.options} if split.options else {})},
        input_dtype=split.input_dtype,
        segments=segments,
        tail=tail,
    )


def export_split(
    model: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    out_dir: str | Path,
    *,
    cut: str | None = None,
    seed: int = 0,
    opset: int = 17,
    **options: Any,
) -> Manifest:
    """Build a seeded split model and export its device bundle in one call."""
    split = build_split(model, input_shape, num_classes, cut=cut, seed=seed, **options)
    return export_bundle(split, out_dir, opset=opset)


def _check_flat(manifest: Manifest, flat: np.ndarray) -> np.ndarray:
    arr = np.asarray(flat)
    if arr.ndim != 1 or arr.size != manifest.num_params:
        raise ValueError(f"flat weights have shape {arr.shape}, expected ({manifest.num_params},) "
                         f"for bundle {manifest.model}/{manifest.cut}")
    return arr.astype(np.float32, copy=False)


def flat_to_state(manifest: Manifest, flat: np.ndarray) -> dict[str, torch.Tensor]:
    """Split a flat device weight vector into tensors keyed by graph input name."""
    arr = _check_flat(manifest, flat)
    return {p.name: torch.from_numpy(arr[p.offset:p.offset + p.size].reshape(p.shape).copy())
            for p in manifest.params}


def _split_params(split: SplitModel, manifest: Manifest) -> dict[str, nn.Parameter]:
    """Map manifest names to the split's parameters, checking names, roles and shapes."""
    owners = {"client": split.client, "aux": split.aux}
    found: dict[str, nn.Parameter] = {}
    for spec in manifest.params:
        prefix = ROLE_PREFIXES[spec.role]
        if not spec.name.startswith(prefix):
            raise ValueError(f"param {spec.name!r} has role {spec.role!r} but no {prefix!r} prefix")
        try:
            param = owners[spec.role].get_parameter(spec.name[len(prefix):])
        except AttributeError as exc:
            raise ValueError(f"bundle param {spec.name!r} does not exist in the split model; "
                             "help: build the split with the bundle's model and cut") from exc
        if tuple(param.shape) != spec.shape:
            raise ValueError(f"param {spec.name!r} has shape {tuple(param.shape)} in the model "
                             f"but {spec.shape} in the bundle")
        found[spec.name] = param
    expected = {n for n, _, _ in trainable_params(train_graph(split))}
    if set(found) != expected:
        raise ValueError(f"bundle and model trainable params differ: only in model "
                         f"{sorted(expected - set(found))[:5]}, only in bundle "
                         f"{sorted(set(found) - expected)[:5]}")
    return found


def load_flat_into(split: SplitModel, manifest: Manifest, flat: np.ndarray) -> None:
    """Copy a flat device weight vector (e.g. the averaged one) into split.client and aux."""
    params = _split_params(split, manifest)
    state = flat_to_state(manifest, flat)
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def aux_from_server(server: nn.Module, manifest: Manifest,
                    flat: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """`flat` with each aux param replaced by the server param of the same name and shape.

    The paper initialises the aux head by copying the server's first blocks and output
    layer; redone every round, the device's local loss keeps tracking the server's loss
    instead of a head that ZO must first fit from random. MiniLM's aux and server heads
    share names (`layers.0.query.lora_A`, `classifier.weight`, ...); a CNN's fc aux
    matches nothing. Returns the new vector and the names copied.
    """
    theirs = dict(server.named_parameters())
    prefix = ROLE_PREFIXES["aux"]
    out, copied = flat.copy(), []
    for spec in manifest.params:
        if spec.role != "aux":
            continue
        param = theirs.get(spec.name[len(prefix):])
        if param is None or tuple(param.shape) != spec.shape:
            continue
        out[spec.offset:spec.offset + spec.size] = (
            param.detach().cpu().numpy().astype(np.float32).ravel())
        copied.append(spec.name)
    return out, copied


def flat_from_split(split: SplitModel, manifest: Manifest) -> np.ndarray:
    """The split's client and aux weights as one flat vector in manifest order."""
    params = _split_params(split, manifest)
    parts = [params[p.name].detach().cpu().numpy().astype(np.float32).ravel()
             for p in manifest.params]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
