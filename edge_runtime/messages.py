"""Message kinds and their binary wire format (no object serialization, no JSON-encoded arrays).

A message is ``MAGIC | u32 header length | header JSON | raw array bytes``. The header
carries the envelope (kind, run id, round, message id, sender), small JSON metadata and an
array table (name, dtype, shape); the arrays follow back to back, little-endian. Large
messages are cut into chunks (see :func:`chunk`) so that each MQTT payload stays under
1 MB, the default packet limit of EMQX and far below Mosquitto's.
"""

from __future__ import annotations

import json
import mmap
import struct
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

MAGIC = b"HRN1"
CHUNK_MAGIC = b"HRC1"
MAX_CHUNK_PAYLOAD = 1_000_000  # bytes per MQTT payload, chunk header included
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 1 * 1024 * 1024
DTYPES = {"float32": "<f4", "float64": "<f8", "int64": "<i8", "int32": "<i4", "uint8": "u1",
          "uint64": "<u8", "bool": "?"}
_CHUNK_HEAD = struct.Struct("<4s16sIIQ")  # magic, message id, index, count, total bytes


class CodecError(ValueError):
    """A payload that cannot be decoded: malformed, truncated, oversized or unknown kind."""


def new_msg_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Message:
    """Envelope shared by every kind; subclasses add their fields."""

    run_id: str
    round: int
    sender: str
    msg_id: str = field(default_factory=new_msg_id)
    kind: ClassVar[str] = "message"
    _arrays: ClassVar[tuple[str, ...]] = ()

    def meta(self) -> dict[str, Any]:
        """JSON-able fields other than the envelope and the arrays."""
        skip = {"run_id", "round", "sender", "msg_id", *self._arrays}
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._arrays}


@dataclass(frozen=True)
class Presence(Message):
    """Retained device or server status; the offline variant is the device's last will.

    The server's online presence carries `server_info` in `info`."""

    state: str = "online"  # online | offline
    info: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "presence"


def server_info(model: str, cut: str, dataset: str, train: dict[str, Any]) -> dict[str, Any]:
    """The server's presence `info`: what it runs, and `train`, the run's training config
    (`TrainConfig.to_json()`, as every round's start carries it), so that a device sizes its
    join-time memory check by the run's batch size before round 1 says it."""
    return {"model": model, "cut": cut, "dataset": dataset, "train": train}


def announced_train(info: Any) -> dict[str, Any] | None:
    """`server_info`'s training config; None from a server that predates it. Raises
    ValueError if it is there but not an object (the caller warns and ignores it)."""
    train = info.get("train") if isinstance(info, dict) else None
    if train is not None and not isinstance(train, dict):
        raise ValueError(f"the server's presence has train = {train!r}, not an object")
    return train


@dataclass(frozen=True)
class Join(Message):
    """A device announcing itself; asks for the bundle unless it has one with this sha."""

    profile: dict[str, Any] = field(default_factory=dict)
    bundle_sha256: str | None = None
    kind: ClassVar[str] = "join"


@dataclass(frozen=True)
class BundleFiles(Message):
    """The bundle's files as raw bytes; the device verifies them against the manifest."""

    names: tuple[str, ...] = ()
    blobs: tuple[np.ndarray, ...] = ()  # uint8, one per name
    kind: ClassVar[str] = "bundle"

    def meta(self) -> dict[str, Any]:
        return {"names": list(self.names)}

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"file{i}": b for i, b in enumerate(self.blobs)}

    def files(self) -> dict[str, bytes]:
        return {n: b.tobytes() for n, b in zip(self.names, self.blobs, strict=True)}

    def release(self) -> None:
        """Drop the file data (a received bundle can be 80 MB): once it is stored, the
        buffer it views is freed even while the message object is still referenced."""
        object.__setattr__(self, "blobs", ())
        object.__setattr__(self, "names", ())

    def views(self) -> dict[str, memoryview]:
        """The files without copying them (to write them to disk, say)."""
        return {n: memoryview(b).cast("B") for n, b in zip(self.names, self.blobs, strict=True)}


@dataclass(frozen=True)
class RoundStart(Message):
    """Global client+aux weights, the participants and the training config for the round."""

    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    participants: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    bundle_sha256: str = ""
    kind: ClassVar[str] = "round"
    _arrays: ClassVar[tuple[str, ...]] = ("weights",)


@dataclass(frozen=True)
class Smashed(Message):
    """Cut-layer activations of one batch with its labels, for the server's FO step."""

    step: int = 0
    activations: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    kind: ClassVar[str] = "smashed"
    _arrays: ClassVar[tuple[str, ...]] = ("activations", "labels")


@dataclass(frozen=True)
class Gradient(Message):
    """SplitFed only: the server's dL/d(smashed) for one uploaded step, and its loss."""

    step: int = 0
    grad: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    loss: float = 0.0
    kind: ClassVar[str] = "grad"
    _arrays: ClassVar[tuple[str, ...]] = ("grad",)


@dataclass(frozen=True)
class Update(Message):
    """Round-end device weights, sample count, telemetry and the round's ZO log."""

    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    num_samples: int = 0
    telemetry: dict[str, Any] = field(default_factory=dict)
    zo_seeds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    zo_grads: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    kind: ClassVar[str] = "update"
    _arrays: ClassVar[tuple[str, ...]] = ("weights", "zo_seeds", "zo_grads")


@dataclass(frozen=True)
class DeviceError(Message):
    """A device reporting a problem it cannot fix itself (errors travel as messages)."""

    error: str = ""
    kind: ClassVar[str] = "error"


@dataclass(frozen=True)
class Stop(Message):
    reason: str = ""
    kind: ClassVar[str] = "stop"


KINDS: dict[str, type[Message]] = {
    cls.kind: cls for cls in (Presence, Join, BundleFiles, RoundStart, Smashed, Gradient,
                              Update, DeviceError, Stop)
}


def _dtype_name(arr: np.ndarray) -> str:
    for name, code in DTYPES.items():  # any byte order; encode writes little-endian
        if arr.dtype.newbyteorder("<") == np.dtype(code).newbyteorder("<"):
            return name
    raise CodecError(f"array dtype {arr.dtype} cannot go on the wire; allowed: {list(DTYPES)}")


def encode(msg: Message) -> bytes:
    """Message → bytes. Arrays are written little-endian whatever the host order."""
    arrays = msg.arrays()
    table, blobs = [], []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        dname = _dtype_name(arr)
        data = np.ascontiguousarray(arr, dtype=DTYPES[dname]).tobytes()
        table.append({"name": name, "dtype": dname, "shape": list(arr.shape)})
        blobs.append(data)
    header = {"v": 1, "kind": msg.kind, "run_id": msg.run_id, "round": int(msg.round),
              "msg_id": msg.msg_id, "sender": msg.sender, "meta": msg.meta(), "arrays": table}
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *blobs])


def decode(data: bytes | bytearray | memoryview) -> Message:
    """bytes → Message, validating every length; raises CodecError, never anything else."""
    try:
        return _decode(memoryview(data))
    except CodecError:
        raise
    except Exception as exc:  # malformed JSON, wrong field types, bad shapes …
        raise CodecError(f"malformed message: {type(exc).__name__}: {exc}") from exc


def _decode(view: memoryview) -> Message:
    if len(view) > MAX_MESSAGE_BYTES:
        raise CodecError(f"message of {len(view)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise CodecError("not a heron message (bad magic)")
    (hlen,) = struct.unpack("<I", view[4:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(view):
        raise CodecError(f"header length {hlen} is larger than the payload")
    header = json.loads(bytes(view[8:8 + hlen]))
    if not isinstance(header, dict) or header.get("v") != 1:
        raise CodecError("unsupported header version")
    cls = KINDS.get(header.get("kind"))
    if cls is None:
        raise CodecError(f"unknown message kind {header.get('kind')!r}")
    pos = 8 + hlen
    arrays: dict[str, np.ndarray] = {}
    for spec in header["arrays"]:
        dname = spec["dtype"]
        if dname not in DTYPES:
            raise CodecError(f"array {spec.get('name')!r} has unsupported dtype {dname!r}")
        shape = tuple(int(s) for s in spec["shape"])
        if any(s < 0 for s in shape) or len(shape) > 8:
            raise CodecError(f"array {spec['name']!r} has a bad shape {shape}")
        dt = np.dtype(DTYPES[dname])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if pos + nbytes > len(view):
            raise CodecError(f"array {spec['name']!r} is truncated: needs {nbytes} bytes, "
                             f"{len(view) - pos} left")
        arr = np.frombuffer(view[pos:pos + nbytes], dtype=dt).reshape(shape)
        # A reassembled message is a private, writable buffer: its arrays may stay views
        # into it (no second copy of a large bundle). A bytes payload is read-only and
        # shared with the MQTT client, so its arrays are copied.
        arrays[str(spec["name"])] = arr.astype(dt.newbyteorder("="),
                                               copy=view.readonly or not dt.isnative)
        pos += nbytes
    if pos != len(view):
        raise CodecError(f"{len(view) - pos} trailing bytes after the last array")
    env = {"run_id": str(header["run_id"]), "round": int(header["round"]),
           "sender": str(header["sender"]), "msg_id": str(header["msg_id"])}
    meta = header["meta"]
    if not isinstance(meta, dict):
        raise CodecError("meta must be an object")
    if cls is BundleFiles:
        if set(meta) != {"names"}:
            raise CodecError(f"bundle message has unknown fields {sorted(set(meta) - {'names'})}")
        names = tuple(str(n) for n in meta["names"])
        blobs = tuple(arrays[f"file{i}"] for i in range(len(names)))
        if len(arrays) != len(names):
            raise CodecError("bundle file table does not match its arrays")
        return BundleFiles(**env, names=names, blobs=blobs)
    if set(arrays) != set(cls._arrays):
        raise CodecError(f"{cls.kind} message needs arrays {sorted(cls._arrays)}, "
                         f"got {sorted(arrays)}")
    fields = dict(meta)
    if "participants" in fields:
        fields["participants"] = tuple(str(p) for p in fields["participants"])
    allowed = set(cls.__dataclass_fields__) - {"run_id", "round", "sender", "msg_id"}
    unknown = set(fields) - allowed
    if unknown:
        raise CodecError(f"{cls.kind} message has unknown fields {sorted(unknown)}")
    return cls(**env, **fields, **arrays)


def chunk(payload: bytes, msg_id: str, max_payload: int = MAX_CHUNK_PAYLOAD) -> list[bytes]:
    """Split an encoded message into MQTT payloads of at most `max_payload` bytes each."""
    per = max_payload - _CHUNK_HEAD.size
    if per <= 0:
        raise ValueError("max_payload is smaller than the chunk header")
    count = max(1, -(-len(payload) // per))
    mid = uuid.UUID(hex=msg_id).bytes
    return [_CHUNK_HEAD.pack(CHUNK_MAGIC, mid, i, count, len(payload)) +
            payload[i * per:(i + 1) * per] for i in range(count)]


@dataclass
class _Partial:
    """A message being rebuilt: each piece is copied into `data` at its offset as it
    arrives, so a large message costs its own size once, not pieces plus their join."""

    count: int
    total: int
    per: int  # bytes in every piece but the last (chunk's split)
    data: mmap.mmap | bytearray  # anonymous mmap: pages become memory only as pieces
    # are written into them (a bare header cannot make the device allocate a message's size)
    have: set[int]
    first_seen: float

    @staticmethod
    def first(count: int, total: int, index: int, size: int, now: float) -> _Partial:
        if count == 1:
            per = total
        elif index < count - 1:
            per = size
        elif (total - size) % (count - 1) == 0:
            per = (total - size) // (count - 1)
        else:
            raise CodecError(f"chunk {index} of {count} has {size} bytes, which no split of "
                             f"{total} gives")
        if count > 1 and (per <= 0 or per * (count - 1) >= total or per * count < total):
            raise CodecError(f"chunk sizes do not add up: {count} chunks of {per} bytes "
                             f"for {total}")
        data = mmap.mmap(-1, total) if total else bytearray()
        return _Partial(count, total, per, data, set(), now)

    def put(self, index: int, piece: bytes) -> None:
        want = self.per if index < self.count - 1 else self.total - self.per * (self.count - 1)
        if len(piece) != want:
            raise CodecError(f"chunk {index} has {len(piece)} bytes, expected {want}")
        self.data[index * self.per:index * self.per + want] = piece
        self.have.add(index)


class Reassembler:
    """Rebuilds messages from chunks that may arrive duplicated or out of order.

    Keyed by (topic, message id) so one sender cannot complete another's message.
    Incomplete messages are dropped after `timeout_s`; completed ids are remembered so a
    QoS 1 redelivery of a whole message is applied once. A message whose declared total is
    over `max_message_bytes` (a device's memory budget) is refused at its first chunk.
    """

    def __init__(self, timeout_s: float = 120.0, max_pending_bytes: int = MAX_MESSAGE_BYTES,
                 remember: int = 4096, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = min(max_message_bytes, MAX_MESSAGE_BYTES)
        self.timeout_s = timeout_s
        self.max_pending_bytes = max_pending_bytes
        self._pending: dict[tuple[str, bytes], _Partial] = {}
        self._done: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._remember = remember
        self.duplicates = 0
        self.expired = 0

    def add(self, topic: str, payload: bytes, now: float | None = None
            ) -> memoryview | None:
        """Feed one MQTT payload; returns the whole message once its last chunk arrives."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        if len(payload) < _CHUNK_HEAD.size:
            raise CodecError(f"chunk of {len(payload)} bytes is shorter than its header")
        if len(payload) > MAX_CHUNK_PAYLOAD:
            raise CodecError(f"oversized chunk: {len(payload)} bytes > {MAX_CHUNK_PAYLOAD}")
        magic, mid, index, count, total = _CHUNK_HEAD.unpack_from(payload)
        if magic != CHUNK_MAGIC:
            raise CodecError("not a heron chunk (bad magic)")
        if count == 0 or index >= count or total > MAX_MESSAGE_BYTES:
            raise CodecError(f"bad chunk header (index {index}, count {count}, total {total})")
        if total > self.max_message_bytes:
            raise CodecError(f"message of {total} bytes is over the {self.max_message_bytes} "
                             "bytes this receiver can hold; dropping chunk")
        key = (topic, mid)
        if key in self._done:
            self.duplicates += 1
            return None
        part = self._pending.get(key)
        piece = payload[_CHUNK_HEAD.size:]
        if part is None:
            if self._pending_bytes() + total > self.max_pending_bytes:
                raise CodecError("too many incomplete messages pending; dropping chunk")
            part = _Partial.first(count, total, index, len(piece), now)
            self._pending[key] = part
        elif part.count != count or part.total != total:
            raise CodecError("chunk header disagrees with earlier chunks of the message")
        if index in part.have:
            self.duplicates += 1
            return None
        part.put(index, piece)
        if len(part.have) < part.count:
            return None
        del self._pending[key]
        data = memoryview(part.data)  # compares equal to the bytes sent; arrays may view it
        self._done[key] = None
        while len(self._done) > self._remember:
            self._done.popitem(last=False)
        return data

    def _pending_bytes(self) -> int:
        return sum(p.total for p in self._pending.values())

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self._pending.items() if now - p.first_seen > self.timeout_s]:
            del self._pending[key]
            self.expired += 1
