"""What a device step costs, counted rather than measured: FLOPs of its ONNX graphs and the
payload bytes its messages take on the wire.

`heron profile` (`baselines.profile`) puts these beside the times and memory its child
process measures; each figure names how it was counted (the ``*_METHOD`` strings).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import algorithms as registry
from edge_runtime.protocol.smashed_codec import DEFAULT_CODEC

ROUND_DEVICES = 5  # participants named in the RoundStart used for the byte count
ONNX_FLOPS_METHOD = (
    "ONNX graph: 2 x multiply-accumulates of every Conv/Gemm/MatMul node, shapes from onnx "
    "shape inference at the profiled batch, x forward passes per step (the training graph: "
    "client + aux head + loss); norms, activations, the loss and the ZO vector arithmetic "
    "(direction, perturbation, Adam: O(d) each) are not counted")
BLOCK_FLOPS_METHOD = (
    "ONNX graphs of the bundle's segments, counted as ONNX_FLOPS_METHOD: the unperturbed pass "
    "through every segment plus the re-run from the perturbed segment j on, averaged over "
    "the blocks the timed steps drew (edge_runtime.zo.BlockSampler)")
TORCH_FLOPS_METHOD = (
    "torch.utils.flop_counter.FlopCounterMode over one step (forward and backward: "
    "convolution, mm/addmm/bmm; 2 FLOPs per multiply-accumulate); norms, activations, the "
    "loss and the optimizer are not counted")
BYTES_METHOD = (
    "MQTT payload bytes as heron's codec sends them (edge_runtime.protocol.encode + chunk "
    "headers). The smashed data are coded under the profiled --smashed-codec (Smashed.coded "
    "on a zero batch: int8's scale and offset, one per channel, included). Per step: the "
    "smashed-data uploads (and, for SplitFed, cut-layer gradients "
    "down) averaged over the round's steps. Per round: those plus the weights broadcast "
    "(RoundStart) and the Update back (weights, sample count, telemetry). "
    "SplitFed's gradient is sized as a Smashed message carrying the gradient array (the "
    "codec has no gradient kind). frozen: one smashed batch per step, ceil(h/k) per round, "
    "no weights either way")


def onnx_graph_flops(graph: str | Path | bytes, batch: int) -> int:
    """2 x MACs of the Conv/Gemm/MatMul nodes of one forward pass at `batch` samples."""
    import onnx
    from onnx import shape_inference

    proto = onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(str(graph))
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_value = batch  # replaces the symbolic batch axis
    inferred = shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}

    def collect(model: Any) -> None:
        for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
            dims = value.type.tensor_type.shape.dim
            if value.name not in shapes and all(d.HasField("dim_value") for d in dims):
                shapes[value.name] = tuple(int(d.dim_value) for d in dims)

    collect(inferred)
    counted = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    if any(name not in shapes for n in counted for name in (n.input[0], n.output[0])):
        # onnx's inference stops at Slice bounds computed in the graph (minilm's aux);
        # ONNX Runtime's symbolic inference propagates them
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        collect(SymbolicShapeInference.infer_shapes(proto, auto_merge=True))
    for init in proto.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)

    def shape(name: str, node: Any) -> tuple[int, ...]:
        if name not in shapes:
            raise ValueError(f"no static shape for {name!r} ({node.op_type} {node.name!r}); "
                             "cannot count its FLOPs")
        return shapes[name]

    macs = 0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            out, w = shape(node.output[0], node), shape(node.input[1], node)
            macs += math.prod(out) * math.prod(w[1:])  # w[1] is C_in / groups
        elif node.op_type == "Gemm":
            a = shape(node.input[0], node)
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            macs += math.prod(shape(node.output[0], node)) * (a[0] if trans_a else a[1])
        elif node.op_type == "MatMul":
            a = shape(node.input[0], node)
            macs += math.prod(shape(node.output[0], node)) * a[-1]
        elif node.op_type in ("ConvTranspose", "Einsum", "Attention"):
            raise ValueError(f"FLOP counting does not handle {node.op_type} yet")
    return 2 * macs


def block_flops(bundle: Any, batch: int, draws: list[int], q: int = 1) -> int:
    """FLOPs of a block-wise step with q directions: the unperturbed pass through all
    segments plus q re-runs from segment j on, each averaged with `draws[j]`, how often j
    was drawn (over all directions)."""
    data = bundle.external_data  # then onnx reads the segments from disk, beside their data
    per_segment = [onnx_graph_flops(graph if data is None else data.parent / spec.file, batch)
                   for graph, spec in zip(bundle.segments, bundle.manifest.segments,
                                          strict=True)]
    rerun = sum(n * sum(per_segment[j:]) for j, n in enumerate(draws)) / max(sum(draws), 1)
    return int(round(sum(per_segment) + q * rerun))


def _wire_bytes(msg: Any) -> int:
    from edge_runtime.protocol import chunk, encode

    return sum(len(c) for c in chunk(encode(msg), msg.msg_id))


def payload_bytes(algorithm: str, *, batch: int, smashed_shape: tuple[int, ...],
                  device_params: int, local_steps: int, upload_every: int,
                  smashed_codec: str = DEFAULT_CODEC) -> dict[str, Any]:
    """A device's payload bytes per step and per round for `algorithm` (see BYTES_METHOD).

    `device_params` is what the device holds and exchanges: client + aux (heron, cse-fsl),
    client (SplitFed), the whole model (fedavg); frozen receives them and sends none back.
    The uploads are coded under `smashed_codec`; SplitFed's gradient down stays float32.
    """
    from edge_runtime.protocol import RoundStart, Smashed, TrainConfig, Update

    run, h, k = "0" * 32, local_steps, upload_every
    uploads = -(-h // k)
    smashed = _wire_bytes(Smashed.coded(run, 1, "dev-0", 0, np.zeros(
        (batch, *smashed_shape), np.float32), np.zeros(batch, np.int64), smashed_codec))

    def round_start(d: int) -> int:
        return _wire_bytes(RoundStart(
            run, 1, "server", weights=np.zeros(d, np.float32),
            participants=tuple(f"dev-{i}" for i in range(ROUND_DEVICES)),
            config=TrainConfig(local_steps=h, upload_every=k, batch_size=batch).to_json(),
            bundle_sha256="0" * 64))

    def update(d: int) -> int:
        telemetry = {"peak_rss_mb": 123.45, "step_ms_median": 123.456, "step_ms_mean": 123.456,
                     "round_s": 12.345, "loss_first": 2.302585, "loss_last": 2.302585,
                     "loss_mean": 2.302585, "steps": h, "smashed_sent": uploads, "threads": 2,
                     "bytes_in": 10**7, "bytes_out": 10**7}
        return _wire_bytes(Update(run, 1, "dev-0", weights=np.zeros(d, np.float32),
                                  num_samples=10_000, telemetry=telemetry))

    a = registry.algorithm(algorithm)
    # a device that does not train works only on the steps that upload (frozen)
    steps_per_round = h if a.device_update else uploads
    n_smashed = (h if a.waits_for_gradient else uploads) if a.uploads_smashed else 0
    n_grads = n_smashed if a.waits_for_gradient else 0  # SplitFed: one gradient per upload
    grad = _wire_bytes(Smashed(run, 1, "server", step=0, activations=np.zeros(
        (batch, *smashed_shape), np.float32), labels=np.zeros(0, np.int64))) if n_grads else 0
    # every device ends its round with an update (frozen's carries no weights) and gets the
    # global weights in each RoundStart (frozen's never change, but they are sent)
    up = n_smashed * smashed + update(device_params if a.sends_weights else 0)
    down = n_grads * grad + round_start(device_params)
    step_up, step_down = n_smashed * smashed / steps_per_round, n_grads * grad / steps_per_round
    return {"bytes_per_step": round(step_up + step_down), "bytes_per_round": up + down,
            "bytes_up_per_round": up, "bytes_down_per_round": down,
            "smashed_codec": smashed_codec, "smashed_bytes": smashed if n_smashed else 0,
            "steps_per_round": steps_per_round, "local_steps": h, "upload_every": k,
            "bytes_method": BYTES_METHOD}
