"""The binary wire format: ``MAGIC | u32 header length | header JSON | raw array bytes``.

The header carries the envelope (kind, run id, round, message id, sender), small JSON
metadata and an array table (name, dtype, shape); the arrays follow back to back,
little-endian. No object serialization, no JSON-encoded arrays.

:func:`decode` is the one boundary between the network and the rest of heron: every field of
every kind, nested telemetry, join profiles and the server's presence included, is parsed
into a typed record with explicit bounds (finite numbers in ranges, string lengths and
character sets, array dtypes, shapes and sizes per kind) before any other code sees it.
Anything else raises :class:`CodecError` naming the kind and the field.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edge_runtime.protocol.fields import (
    MAX_LABEL,
    MAX_LOG,
    MAX_MESSAGE_BYTES,
    MAX_ROUND,
    MSG_ID,
    RUN_ID,
    CodecError,
    UnexpectedInput,
    integer,
    matching,
    show,
)
from edge_runtime.protocol.messages import KINDS, ArraySpec, BundleFiles, Message
from edge_runtime.protocol.smashed_codec import check as check_smashed
from edge_runtime.protocol.topics import is_id

MAGIC = b"HRN1"
MAX_HEADER_BYTES = 1 * 1024 * 1024
DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4",
          "uint8": "u1", "uint64": "<u8", "bool": "?"}


# -- encoding ------------------------------------------------------------------------------

def _dtype_name(arr: np.ndarray) -> str:
    for name, code in DTYPES.items():  # any byte order; encode writes little-endian
        if arr.dtype.newbyteorder("<") == np.dtype(code).newbyteorder("<"):
            return name
    raise CodecError(f"array dtype {arr.dtype} cannot go on the wire; allowed: {list(DTYPES)}")


def encode(msg: Message) -> bytes:
    """Message → bytes. Arrays are written little-endian whatever the host order."""
    return _encode_frame(msg.kind, {"run_id": msg.run_id, "round": int(msg.round),
                                    "msg_id": msg.msg_id, "sender": msg.sender},
                         msg.meta(), msg.arrays())


def _encode_frame(kind: str, env: dict[str, Any], meta: dict[str, Any],
                  arrays: Mapping[str, np.ndarray]) -> bytes:
    table, blobs = [], []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        dname = _dtype_name(arr)
        data = np.ascontiguousarray(arr, dtype=DTYPES[dname]).tobytes()
        table.append({"name": name, "dtype": dname, "shape": list(arr.shape)})
        blobs.append(data)
    header = {"v": 1, "kind": kind, **env, "meta": meta, "arrays": table}
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *blobs])


# -- decoding ------------------------------------------------------------------------------

_HEADER_KEYS = {"v", "kind", "run_id", "round", "msg_id", "sender", "meta", "arrays"}
_ENVELOPE: dict[str, Callable[[str, Any], Any]] = {
    "run_id": matching(RUN_ID, "a run id (0-64 letters, digits, '_', '.', '-')"),
    "round": integer(-1, MAX_ROUND),
    "sender": matching(is_id, "a device id or 'server'"),
    "msg_id": matching(MSG_ID, "a message id (32 lowercase hex digits)"),
}


def decode(data: bytes | bytearray | memoryview) -> Message:
    """bytes → Message, with every field typed and bounded; raises CodecError, never
    anything else."""
    try:
        return _decode(memoryview(data))
    except CodecError:
        raise
    except Exception as exc:  # a check this module forgot; still never a crash
        raise UnexpectedInput(f"malformed message: {type(exc).__name__}: {exc}") from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise CodecError("header has an object with a repeated key")
    return out


def _parse_header(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CodecError(f"header is not UTF-8: {exc}") from None
    try:
        # NaN and Infinity parse (as Python's json does) and are refused by the field that
        # holds them, so the error names it: every value in a header passes a field check
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise CodecError("header is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError; an int of more than 4300 digits
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"header is not JSON: {exc}") from None


def _decode(view: memoryview) -> Message:
    if len(view) > MAX_MESSAGE_BYTES:
        raise CodecError(f"message of {len(view)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise CodecError("not a heron message (bad magic)")
    (hlen,) = struct.unpack("<I", view[4:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(view):
        raise CodecError(f"header length {hlen} is larger than the payload")
    header = _parse_header(bytes(view[8:8 + hlen]))
    if not isinstance(header, dict):
        raise CodecError("header is not a JSON object")
    if type(header.get("v")) is not int or header["v"] != 1:
        raise CodecError(f"unsupported header version {show(header.get('v'))}")
    kind = header.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CodecError(f"unknown message kind {show(kind)}")
    if set(header) != _HEADER_KEYS:
        missing, extra = _HEADER_KEYS - set(header), set(header) - _HEADER_KEYS
        raise CodecError(f"{kind} header: missing {sorted(missing)}, unknown "
                         f"{show(sorted(extra))}")
    if len(view) > cls.max_bytes:
        raise CodecError(f"{kind} message of {len(view)} bytes exceeds the {kind} limit of "
                         f"{cls.max_bytes}")
    env = {k: parse(f"{kind}.{k}", header[k]) for k, parse in _ENVELOPE.items()}
    meta = header["meta"]
    if not isinstance(meta, dict):
        raise CodecError(f"{kind}.meta: not an object")
    if set(meta) != set(cls._meta):
        missing, extra = set(cls._meta) - set(meta), set(meta) - set(cls._meta)
        raise CodecError(f"{kind} message: missing fields {sorted(missing)}, unknown fields "
                         f"{show(sorted(extra))}")
    values = {k: parse(f"{kind}.{k}", meta[k]) for k, parse in cls._meta.items()}
    specs = ({f"file{i}": ArraySpec("uint8", (1, 1)) for i in range(len(values["names"]))}
             if cls is BundleFiles else cls._arrays)
    arrays = _read_arrays(view, 8 + hlen, header["arrays"], specs, kind)
    if cls is BundleFiles:
        return BundleFiles(**env, names=values["names"], blobs=tuple(arrays.values()))
    _check_together(kind, arrays, values)
    if kind == "update":
        _check_update_meta(values, arrays)
    return cls(**env, **values, **arrays)


def _read_arrays(view: memoryview, pos: int, table: Any, specs: Mapping[str, ArraySpec],
                 kind: str) -> dict[str, np.ndarray]:
    """The arrays `table` describes, each checked against its spec before its bytes are
    touched (dtype, dimensions, size) and after (finite, non-negative)."""
    if not isinstance(table, list) or len(table) != len(specs):
        raise CodecError(f"{kind} message needs arrays {sorted(specs)}, got a table of "
                         f"{len(table) if isinstance(table, list) else show(table)}")
    out: dict[str, np.ndarray] = {}
    for entry in table:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise CodecError(f"{kind}.arrays: an entry is not {{name, dtype, shape}}")
        name = entry["name"]
        if not isinstance(name, str) or name not in specs or name in out:
            raise CodecError(f"{kind}.arrays: unexpected or repeated array {show(name)}; "
                             f"needs {sorted(specs)}")
        spec, where = specs[name], f"{kind}.{name}"
        allowed = (spec.dtype, *spec.also)
        if entry["dtype"] not in allowed:
            raise CodecError(f"{where}: dtype {show(entry['dtype'])}, expected "
                             f"{' or '.join(allowed)}")
        shape = entry["shape"]
        if not isinstance(shape, list) or not spec.ndim[0] <= len(shape) <= spec.ndim[1]:
            raise CodecError(f"{where}: shape {show(shape)} is not a list of "
                             f"{spec.ndim[0]}..{spec.ndim[1]} dimensions")
        dims = tuple(integer(0, MAX_MESSAGE_BYTES)(f"{where}.shape", s) for s in shape)
        dt = np.dtype(DTYPES[entry["dtype"]])
        nbytes = math.prod(dims) * dt.itemsize  # Python ints: no overflow
        if nbytes > len(view) - pos:
            raise CodecError(f"{where} is truncated: needs {nbytes} bytes, "
                             f"{len(view) - pos} left")
        arr = np.frombuffer(view[pos:pos + nbytes], dtype=dt).reshape(dims)
        # A reassembled message is a private, writable buffer: its arrays may stay views
        # into it (no second copy of a large bundle). A bytes payload is read-only and
        # shared with the MQTT client, so its arrays are copied.
        arr = arr.astype(dt.newbyteorder("="), copy=view.readonly or not dt.isnative)
        if spec.finite and not _all_finite(arr):
            raise CodecError(f"{where}: contains NaN or Inf")
        if spec.nonneg and arr.size and not (0 <= int(arr.min()) and
                                             int(arr.max()) <= MAX_LABEL):
            raise CodecError(f"{where}: values outside 0..{MAX_LABEL}")
        out[name] = arr
        pos += nbytes
    if pos != len(view):
        raise CodecError(f"{kind} message: {len(view) - pos} trailing bytes after the last "
                         "array")
    return {name: out[name] for name in specs}


def _all_finite(arr: np.ndarray, block: int = 1 << 20) -> bool:
    """np.isfinite a block at a time: a 256 MB update needs 1 MB of scratch, not 64 MB."""
    flat = arr.reshape(-1)
    return all(np.isfinite(flat[i:i + block]).all() for i in range(0, flat.size, block))


def _check_together(kind: str, arrays: dict[str, np.ndarray],
                    values: dict[str, Any]) -> None:
    """Bounds that tie one field of a kind to another."""
    if kind == "smashed":
        why = check_smashed(values["codec"], arrays["activations"], arrays["scale"],
                            arrays["offset"])
        if why:
            raise CodecError(f"smashed.codec: {why}")
        batch = arrays["activations"].shape[0]
        if batch < 1 or arrays["labels"].shape != (batch,):
            raise CodecError(f"smashed.labels: shape {arrays['labels'].shape} for activations "
                             f"of shape {arrays['activations'].shape}; expected ({batch},) "
                             "and a batch of at least 1")
    elif kind == "grad" and arrays["grad"].shape[0] < 1:
        raise CodecError("grad.grad: an empty batch")
    elif kind == "update":
        n = arrays["seeds"].shape[0]
        if arrays["projected"].shape != (n,) or n > MAX_LOG:
            raise CodecError(f"update.projected: shape {arrays['projected'].shape} for "
                             f"{n} seeds; expected one per seed and at most {MAX_LOG}")


def _check_update_meta(values: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """An update is weights, or a replay log with the hash of the weights it led to."""
    if values["weights_hash"] is None:
        if arrays["seeds"].shape[0]:
            raise CodecError("update.weights_hash: missing; a replay log (seeds, projected) "
                             "comes with the hash of the weights it led to")
    elif arrays["weights"].shape[0]:
        raise CodecError("update: carries both weights and a replay log; expected one")

