"""The one file an ONNX graph from a server may read: external-data references.

A tensor of an ONNX model can keep its bytes in a file its `external_data` entries name,
and ONNX Runtime opens that file when it builds a session. A device must refuse, before any
session exists, a graph that names anything but its bundle's own data file (see
`edge_runtime.bundle` for why the session's folder option alone is not enough). The device has
no `onnx` package, so the graph's protobuf wire format is walked here directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class UnsafeGraphError(ValueError):
    """A graph names external data other than its bundle's own file, or is malformed."""


EXTERNAL_KEYS = ("location", "offset", "length", "checksum")  # what ONNX defines
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_NESTING = 100  # protobuf's default recursion limit: ONNX Runtime parses no deeper

# The protobuf field numbers (onnx/onnx.proto3) on every path from a ModelProto to a
# TensorProto, and nothing else: message -> {field number: message it holds}. Tensors hide in
# graph initializers, sparse initializers, node attributes (t, tensors, sparse tensors) and in
# the subgraphs of attributes (If, Loop, Scan), training-info graphs and model functions.
_MODEL, _GRAPH, _NODE, _ATTR, _SPARSE, _TRAINING, _FUNCTION, _TENSOR = range(8)
_HOLDS: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTR},  # attribute
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _FUNCTION: {7: _NODE, 11: _ATTR},  # node, attribute_proto
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2  # StringStringEntryProto
_DECIMAL = re.compile(r"^[0-9]{1,19}$")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> list[tuple[int, int | memoryview]]:
    """(field number, value) of one protobuf message: an int for a varint, a view for a
    length-delimited field; fixed-width fields are skipped. No groups: ONNX has none."""
    out: list[tuple[int, int | memoryview]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, value))
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("a length-delimited field runs past its message")
            out.append((number, buf[pos:pos + size]))
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(buf):
                raise ValueError("a fixed-width field runs past its message")
        else:
            raise ValueError(f"wire type {wire} (groups are not used by ONNX)")
    return out


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external-data reference, as ONNX Runtime would read it."""

    tensor: str
    external: bool  # data_location == EXTERNAL
    entries: tuple[tuple[str, str], ...]  # (key, value) in order


def external_refs(graph: bytes | memoryview) -> list[ExternalRef]:
    """Every tensor of a serialized ModelProto that names external data, found by walking
    the protobuf wire format over the fields in `_HOLDS` (the device has no `onnx`
    package). Raises ValueError for bytes that are not a well-formed protobuf message.

    A message field given twice is merged by protobuf, so every occurrence is walked; a
    scalar given twice keeps its last value, as here."""
    refs: list[ExternalRef] = []
    stack: list[tuple[int, memoryview, int]] = [(_MODEL, memoryview(graph).cast("B"), 0)]
    while stack:
        kind, buf, depth = stack.pop()
        if depth > _MAX_NESTING:
            raise ValueError(f"messages nested more than {_MAX_NESTING} deep")
        fields = _fields(buf)
        if kind != _TENSOR:
            holds = _HOLDS[kind]
            stack.extend((holds[n], v, depth + 1) for n, v in reversed(fields)
                         if n in holds and isinstance(v, memoryview))
            continue
        name, external, entries = "", False, []
        for number, value in fields:
            if number == _TENSOR_NAME and isinstance(value, memoryview):
                name = bytes(value).decode("utf-8", "replace")
            elif number == _TENSOR_DATA_LOCATION and isinstance(value, int):
                external = value == _EXTERNAL
            elif number == _TENSOR_EXTERNAL_DATA and isinstance(value, memoryview):
                key = val = b""
                for n, v in _fields(value):
                    if isinstance(v, memoryview) and n in (_ENTRY_KEY, _ENTRY_VALUE):
                        key, val = (bytes(v), val) if n == _ENTRY_KEY else (key, bytes(v))
                entries.append((key.decode("utf-8", "replace"), val.decode("utf-8", "replace")))
        if external or entries:
            refs.append(ExternalRef(name, external, tuple(entries)))
    return refs


def check_external_data(graph: bytes | memoryview, file: str, data_size: int | None,
                        data_file: str) -> int:
    """Refuse a graph that would make ONNX Runtime read anything but `data_size` bytes of
    the bundle's own `data_file` (None: the bundle has none, so no tensor may be external).
    Returns how many tensors are external. Runs before any session is made."""
    if bytes(graph[4:8]) == b"ORTM":  # the flatbuffer format's file identifier
        raise UnsafeGraphError(f"{file} is in ONNX Runtime's own format, not ONNX; help: re-export "
                          "the bundle")
    try:
        refs = external_refs(graph)
    except ValueError as exc:
        raise UnsafeGraphError(f"{file} is not a well-formed ONNX model ({exc}); help: re-export "
                          "the bundle, or check that the server is the one you joined") from exc
    for ref in refs:
        where = f"{file}: tensor {ref.tensor!r}"
        keys = [k for k, _ in ref.entries]
        entries = dict(ref.entries)
        unknown = sorted(set(keys) - set(EXTERNAL_KEYS))
        if unknown or len(set(keys)) != len(keys):
            raise UnsafeGraphError(f"{where} has external-data keys {keys}; only one each of "
                              f"{', '.join(EXTERNAL_KEYS)} are allowed")
        location = entries.get("location")
        if location != data_file:
            raise UnsafeGraphError(
                f"{where} asks for external data from {location!r}; a bundle's graphs may read "
                f"only the bundle's own {data_file}, so this one is refused before ONNX "
                "Runtime opens anything; help: the server sent a hostile or corrupt bundle, "
                "check that it is the one you joined, or re-export the bundle")
        if data_size is None:
            raise UnsafeGraphError(f"{where} keeps its data in {data_file}, which this bundle's "
                              "manifest does not list; help: re-export the bundle")
        offset, length = entries.get("offset", "0"), entries.get("length")
        if length is None or not _DECIMAL.match(offset) or not _DECIMAL.match(length):
            raise UnsafeGraphError(f"{where} has external-data offset {offset!r} and length "
                              f"{length!r}; both must be decimal byte counts")
        if int(offset) + int(length) > data_size:
            raise UnsafeGraphError(f"{where} reads bytes {offset}..{int(offset) + int(length)} of "
                              f"{data_file}, which holds {data_size}; help: re-export the "
                              "bundle")
    return len(refs)
