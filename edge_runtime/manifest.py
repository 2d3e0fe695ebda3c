"""What a bundle's manifest.json says: the graph interface, the parameter and segment layout.

The format is owned here, in the torch-free core, so the exporter (which writes it) and
the device (which reads it) cannot drift apart; `edge_runtime.bundle` reads, verifies,
writes and stores the bundle directory this describes.

The training graph's inputs are x, y and one input per trainable param; its outputs are
loss, smashed and logits. Trainable parameters are graph *inputs*, so a ZO step feeds
perturbed weights to the same ONNX Runtime session instead of rebuilding it; they lie back
to back in one flat float32 vector (`ParamSpec.offset`).

Optionally (manifest key ``segments``) the same computation is also shipped as a chain of
graphs, one per block of the client plus one for aux head and loss::

    segment0.onnx … segmentN.onnx
        inputs: input (x for the first), [y for the last], the segment's trainable params
        output: output (the next segment's input; the last client segment's is the smashed
                data), loss for the last

Each segment owns one contiguous slice of the flat weight vector. Block-wise ZO
(`edge_runtime.blockzo`) perturbs one segment and re-runs the chain from its cached input.
Optionally (manifest key ``tail``, the `heron-tail` algorithm) a gradient graph::

    tail.onnx   inputs: x, y (batch fixed to ``tail.batch``), every trainable param
                outputs: loss, smashed, grad.<name> for each param in ``tail.trained``

It returns the aux loss's exact gradient w.r.t. the trained tensors (the last device map and
the aux head), which the device steps with numpy Adam (`edge_runtime.runtime`).

A segment may also come as ``segmentK.nchwc.onnx``: the same computation with its
convolutions in ONNX Runtime's blocked NCHWc layout, which the device uses when its ONNX
Runtime can run it and it agrees with the plain graph (see `edge_runtime.blockzo`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

FORMAT_VERSION = 1

INPUT_NAME = "x"
LABEL_NAME = "y"
LOSS_OUTPUT = "loss"
SMASHED_OUTPUT = "smashed"
LOGITS_OUTPUT = "logits"
ROLES = ("client", "aux")
SEGMENT_INPUT = "input"
SEGMENT_OUTPUT = "output"
NCHWC_DOMAIN = "com.microsoft.nchwc"  # ONNX Runtime's blocked-layout CPU kernels
NCHWC_LAYOUTS = "heron.nchwc_layouts"  # model metadata: JSON {filter input: its layout}
PLAIN_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a plain name: no directories
INPUT_DTYPES = ("float32", "int64")  # images / token ids + attention mask
GRAD_PREFIX = "grad."  # the tail graph's output for a trained param: GRAD_PREFIX + its name
MAX_TAIL_BATCH = 4096  # a tail graph's fixed batch; more is a hostile or broken manifest


class BundleError(ValueError):
    """A bundle is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class ParamSpec:
    """One trainable tensor inside the flat weight vector."""

    name: str
    shape: tuple[int, ...]
    role: str  # "client" (part of the split model) or "aux" (local head)
    offset: int  # in elements, into the flat float32 vector

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class SegmentSpec:
    """One graph of the segment chain and the slice of the flat weight vector it owns."""

    name: str  # the block, e.g. "layer1.0"; "aux" for the head + loss
    file: str
    offset: int  # in elements, into the flat float32 vector
    size: int  # elements; its params are exactly the manifest params in [offset, offset+size)
    params: tuple[str, ...]  # graph input names, in manifest order
    nchwc_file: str | None = None  # the same segment with NCHWc convolutions, if shipped

    def to_json(self) -> dict[str, Any]:
        obj = {"name": self.name, "file": self.file, "offset": self.offset,
               "size": self.size, "params": list(self.params)}
        if self.nchwc_file is not None:
            obj["nchwc_file"] = self.nchwc_file
        return obj


@dataclass(frozen=True)
class TailSpec:
    """The tail-gradient graph (`heron-tail`): its file, fixed batch and trained params."""

    file: str
    tail_set: str  # which tensors of the client it trains (exporter.tail_grad.TAIL_SETS)
    trained: tuple[str, ...]  # manifest param names it returns gradients for, in order
    batch: int  # the graph's fixed batch size (its shapes are static)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "tail_set": self.tail_set, "trained": list(self.trained),
                "batch": self.batch}


def _tail_from_json(obj: Any, params: tuple[ParamSpec, ...], files: dict[str, str]) -> TailSpec:
    """Check the tail entry against the params and files, as every manifest field is."""
    if not isinstance(obj, dict) or set(obj) != {"file", "tail_set", "trained", "batch"}:
        raise BundleError("manifest tail must be an object with exactly file, tail_set, "
                          "trained and batch; help: re-export the bundle")
    file, trained, batch = obj["file"], obj["trained"], obj["batch"]
    if not isinstance(file, str) or not PLAIN_FILE_NAME.match(file) or file not in files:
        raise BundleError(f"tail file {file!r} is not a plain file name listed with a sha256 "
                          "in the manifest's files")
    if not isinstance(obj["tail_set"], str):
        raise BundleError("manifest tail_set must be a string")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_TAIL_BATCH:
        raise BundleError(f"tail batch must be an integer in 1..{MAX_TAIL_BATCH}, got {batch!r}")
    order = [p.name for p in params]
    if (not isinstance(trained, list) or not trained
            or not all(isinstance(n, str) for n in trained)):
        raise BundleError("tail trained must be a non-empty list of param names")
    unknown = [n for n in trained if n not in order]
    if unknown:
        raise BundleError(f"tail trains {unknown[:3]}, which are not manifest params")
    if len(set(trained)) != len(trained) or sorted(trained, key=order.index) != trained:
        raise BundleError("tail trained names must be distinct and in manifest param order")
    return TailSpec(file, obj["tail_set"], tuple(trained), batch)


class SegmentGraphs(NamedTuple):
    """What the exporter hands `write_bundle` per segment, in chain order."""

    name: str
    graph: bytes  # ONNX
    num_params: int  # how many of the bundle's params (in order) the segment owns
    nchwc: bytes | None = None  # optional NCHWc variant of `graph`


def _segments_from_json(objs: Any, params: tuple[ParamSpec, ...],
                        files: dict[str, str]) -> tuple[SegmentSpec, ...]:
    """Check that the segments tile the flat vector in manifest order, one file each."""
    if not isinstance(objs, list) or len(objs) < 2:
        raise BundleError("manifest segments must be a list of at least two (client blocks, "
                          "then the aux head); help: re-export the bundle")
    segments, offset, index = [], 0, 0
    for obj in objs:
        nchwc = obj.get("nchwc_file")
        seg = SegmentSpec(str(obj["name"]), str(obj["file"]), int(obj["offset"]),
                          int(obj["size"]), tuple(str(n) for n in obj["params"]),
                          None if nchwc is None else str(nchwc))
        owned = params[index:index + len(seg.params)]
        if (seg.offset != offset or seg.size < 0
                or tuple(p.name for p in owned) != seg.params
                or sum(p.size for p in owned) != seg.size):
            raise BundleError(f"segment {seg.name!r} does not own the next "
                              f"{len(seg.params)} manifest params at offset {offset}")
        for file in filter(None, (seg.file, seg.nchwc_file)):
            if not PLAIN_FILE_NAME.match(file) or file not in files:
                raise BundleError(f"segment {seg.name!r} file {file!r} is not a plain file "
                                  "name listed with a sha256 in the manifest's files")
        segments.append(seg)
        offset += seg.size
        index += len(seg.params)
    if index != len(params):
        raise BundleError(f"segments own {index} of the {len(params)} manifest params")
    named = [f for s in segments for f in (s.file, s.nchwc_file) if f is not None]
    if len(set(named)) != len(named):
        raise BundleError("two segment graphs share one file")
    return tuple(segments)


@dataclass(frozen=True)
class Manifest:
    model: str
    cut: str
    input_shape: tuple[int, ...]  # per-sample shape, e.g. (1, 8, 8)
    num_classes: int
    smashed_shape: tuple[int, ...]  # per-sample cut-layer activation shape
    opset: int
    params: tuple[ParamSpec, ...]
    files: dict[str, str]  # file name -> sha256 hex
    extra: dict[str, Any]
    input_dtype: str = "float32"  # of x; a manifest that names none means float32
    segments: tuple[SegmentSpec, ...] = ()  # the optional segment chain (see module doc)
    tail: TailSpec | None = None  # the optional tail-gradient graph (see module doc)

    @property
    def num_params(self) -> int:
        return sum(p.size for p in self.params)

    def to_json(self) -> dict[str, Any]:
        obj = {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "cut": self.cut,
            "input": {"name": INPUT_NAME, "shape": [None, *self.input_shape],
                      "dtype": self.input_dtype},
            "label": {"name": LABEL_NAME, "shape": [None], "dtype": "int64"},
            "outputs": {
                LOSS_OUTPUT: {"shape": [], "dtype": "float32"},
                SMASHED_OUTPUT: {"shape": [None, *self.smashed_shape], "dtype": "float32"},
                LOGITS_OUTPUT: {"shape": [None, self.num_classes], "dtype": "float32"},
            },
            "num_classes": self.num_classes,
            "opset": self.opset,
            "params": [
                {"name": p.name, "shape": list(p.shape), "dtype": "float32", "role": p.role,
                 "offset": p.offset}
                for p in self.params
            ],
            "num_params": self.num_params,
            "files": dict(self.files),
            "extra": self.extra,
        }
        if self.segments:  # only then: no key means no segment chain
            obj["segments"] = [s.to_json() for s in self.segments]
        if self.tail is not None:
            obj["tail"] = self.tail.to_json()
        return obj

    @staticmethod
    def from_json(obj: Any) -> Manifest:
        try:
            if obj.get("format_version") != FORMAT_VERSION:
                raise BundleError(
                    f"manifest format_version {obj.get('format_version')!r} is not "
                    f"{FORMAT_VERSION}; help: re-export the bundle with this heron version"
                )
            params = []
            offset = 0
            for p in obj["params"]:
                spec = ParamSpec(str(p["name"]), tuple(int(s) for s in p["shape"]),
                                 str(p["role"]), int(p["offset"]))
                if spec.role not in ROLES:
                    raise BundleError(f"param {spec.name!r} has unknown role {spec.role!r}")
                if spec.offset != offset or any(s <= 0 for s in spec.shape):
                    raise BundleError(f"param {spec.name!r} has a bad offset or shape")
                offset += spec.size
                params.append(spec)
            input_dtype = str(obj["input"].get("dtype", "float32"))
            if input_dtype not in INPUT_DTYPES:
                raise BundleError(f"manifest input dtype {input_dtype!r} is not one of "
                                  f"{INPUT_DTYPES}; help: re-export the bundle")
            return Manifest(
                model=str(obj["model"]),
                cut=str(obj["cut"]),
                input_shape=tuple(int(s) for s in obj["input"]["shape"][1:]),
                num_classes=int(obj["num_classes"]),
                smashed_shape=tuple(
                    int(s) for s in obj["outputs"][SMASHED_OUTPUT]["shape"][1:]),
                opset=int(obj["opset"]),
                params=tuple(params),
                files={str(k): str(v) for k, v in obj["files"].items()},
                extra=dict(obj.get("extra", {})),
                input_dtype=input_dtype,
                segments=(() if obj.get("segments") is None else _segments_from_json(
                    obj["segments"], tuple(params), dict(obj["files"]))),
                tail=(None if obj.get("tail") is None else _tail_from_json(
                    obj["tail"], tuple(params), dict(obj["files"]))),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"manifest is malformed ({type(exc).__name__}: {exc})") from exc


def param_specs(named_shapes: list[tuple[str, tuple[int, ...], str]]) -> tuple[ParamSpec, ...]:
    """Lay out (name, shape, role) triples back to back in one flat vector."""
    specs, offset = [], 0
    for name, shape, role in named_shapes:
        spec = ParamSpec(name, tuple(int(s) for s in shape), role, offset)
        specs.append(spec)
        offset += spec.size
    return tuple(specs)


def unflatten(params: tuple[ParamSpec, ...], flat: np.ndarray) -> dict[str, np.ndarray]:
    """Views into `flat`, one per param, without copying."""
    return {p.name: flat[p.offset:p.offset + p.size].reshape(p.shape) for p in params}
