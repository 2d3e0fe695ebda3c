"""Message kinds and their binary wire format (no object serialization, no JSON-encoded arrays).

A message is ``MAGIC | u32 header length | header JSON | raw array bytes``. The header
carries the envelope (kind, run id, round, message id, sender), small JSON metadata and an
array table (name, dtype, shape); the arrays follow back to back, little-endian. Large
messages are cut into chunks (see :func:`chunk`) so that each MQTT payload stays under
1 MB, the default packet limit of EMQX and far below Mosquitto's.

:func:`decode` is the one boundary between the network and the rest of heron: every field of
every kind, nested telemetry, join profiles and the server's presence included, is parsed
into a typed record with explicit bounds (finite numbers in ranges, string lengths and
character sets, array dtypes, shapes and sizes per kind) before any other code sees it.
Anything else raises :class:`CodecError` naming the kind and the field, e.g.
``update.telemetry.loss_mean: nan is not a finite number``. Messages are not checked when
built (the receiver is the boundary: a test must be able to send a NaN), but the nested
records (Telemetry, JoinProfile, ServerInfo) validate themselves, so a sender cannot build one
its receiver would refuse, and a message's free text is cut to what a receiver takes.

Size limits are per kind (`Message.max_bytes`, `max_bytes(kind)`): checked by decode and, where
the topic tells the kind, by the Reassembler on a message's first chunk.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import numpy as np

from edge_runtime.topics import is_id

MAGIC = b"HRN1"
CHUNK_MAGIC = b"HRC1"
MAX_CHUNK_PAYLOAD = 1_000_000  # bytes per MQTT payload, chunk header included
MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # the largest kind's limit (a bundle)
MAX_HEADER_BYTES = 1 * 1024 * 1024
DTYPES = {"float32": "<f4", "float64": "<f8", "int64": "<i8", "int32": "<i4", "uint8": "u1",
          "uint64": "<u8", "bool": "?"}
_CHUNK_HEAD = struct.Struct("<4s16sIIQ")  # magic, message id, index, count, total bytes

# Bounds of the fields below. Generous for any real run; what they exclude is what breaks
# arithmetic downstream (NaN, inf, 1e308 summed, 2**200 as a numpy index) or fills a log.
MAX_ROUND = 10**9
MAX_STEP = 10**9
MAX_SAMPLES = 10**9  # a device's sample count, also the averaging weight
MAX_LOSS = 1e12
MAX_MB = 1e8  # 100 TB: any RSS or budget in MB
MAX_MS = 1e9  # ~11 days: any step or round time
MAX_COUNT = 2**53  # byte and event counters: exact in a float64
MAX_THREADS = 4096
MAX_BATCH = 1 << 20
MAX_LABEL = 2**31 - 1
MAX_PARTICIPANTS = 10_000
MAX_BUNDLE_FILES = 64
MAX_ERROR_CHARS = 4096
MAX_REASON_CHARS = 1024
MAX_TEXT_CHARS = 256  # version strings, model and dataset names
MAX_CONFIG_KEYS = 64
MAX_CONFIG_DEPTH = 3  # a training config: {"zo": {"mu": ...}} is depth 2
MAX_NDIM = 8

_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{0,64}")
_MSG_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # algorithm, model, board profile
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a config key
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a plain file name, no directories


class CodecError(ValueError):
    """A payload that cannot be decoded: malformed, truncated, oversized, unknown kind, or a
    field out of its bounds. The message names the kind and the field."""


class _UnexpectedInput(CodecError):
    """Input that no explicit check named (a decoder bug if it ever shows); still a
    CodecError so one payload cannot stop a receiver, but the fuzz tests look for it."""


def new_msg_id() -> str:
    return uuid.uuid4().hex


# -- field parsers: (where, value) -> typed value, or CodecError naming `where` -------------

def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def parse(where: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise CodecError(f"{where}: {_show(v)} is not an integer")
        if not lo <= int(v) <= hi:
            raise CodecError(f"{where}: {_show(v)} is outside {lo}..{hi}")
        return int(v)
    return parse


def _real(lo: float, hi: float) -> Callable[[str, Any], float]:
    def parse(where: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise CodecError(f"{where}: {_show(v)} is not a number")
        if isinstance(v, (float, np.floating)) and not math.isfinite(v):
            raise CodecError(f"{where}: {_show(v)} is not a finite number")
        if not lo <= v <= hi:  # exact for ints of any size, before float() could overflow
            raise CodecError(f"{where}: {_show(v)} is outside {lo:g}..{hi:g}")
        return float(v)
    return parse


def _bool(where: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise CodecError(f"{where}: {_show(v)} is not true or false")
    return bool(v)


def _match(pattern: re.Pattern[str] | Callable[[str], bool], what: str
           ) -> Callable[[str, Any], str]:
    """A string that matches `pattern` whole (or passes it, if it is a function)."""
    ok = pattern if callable(pattern) else (lambda s: pattern.fullmatch(s) is not None)

    def parse(where: str, v: Any) -> str:
        if not isinstance(v, str) or not ok(v):
            raise CodecError(f"{where}: {_show(v)} is not {what}")
        return v
    return parse


def _text(max_chars: int) -> Callable[[str, Any], str]:
    """Free text: printable characters, newlines and tabs (no escapes that rewrite a log)."""
    def parse(where: str, v: Any) -> str:
        if not isinstance(v, str):
            raise CodecError(f"{where}: {_show(v)} is not a string")
        if len(v) > max_chars:
            raise CodecError(f"{where}: {len(v)} characters, more than {max_chars}")
        if not all(c.isprintable() or c in "\n\t" for c in v):
            raise CodecError(f"{where}: contains control or unpaired surrogate characters")
        return v
    return parse


def _choice(*options: str) -> Callable[[str, Any], str]:
    def parse(where: str, v: Any) -> str:
        if v not in options or not isinstance(v, str):
            raise CodecError(f"{where}: {_show(v)} is not one of {', '.join(options)}")
        return v
    return parse


def _id_list(max_items: int) -> Callable[[str, Any], tuple[str, ...]]:
    def parse(where: str, v: Any) -> tuple[str, ...]:
        if not isinstance(v, (list, tuple)) or len(v) > max_items:
            raise CodecError(f"{where}: expected a list of at most {max_items} ids")
        out = tuple(_match(is_id, "a device id")(f"{where}[{i}]", x) for i, x in enumerate(v))
        if len(set(out)) != len(out):
            raise CodecError(f"{where}: lists an id twice")
        return out
    return parse


def _optional(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def opt(where: str, v: Any) -> Any:
        return None if v is None else parse(where, v)
    return opt


def _show(v: Any) -> str:
    """A value for an error message, never longer than a line."""
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _config(where: str, v: Any, depth: int = 1) -> dict[str, Any]:
    """A training config as JSON: objects of scalars, nested at most MAX_CONFIG_DEPTH deep.
    Its meaning (TrainConfig.from_json) is checked by the device that runs it."""
    if not isinstance(v, dict):
        raise CodecError(f"{where}: {_show(v)} is not an object")
    if len(v) > MAX_CONFIG_KEYS:
        raise CodecError(f"{where}: {len(v)} keys, more than {MAX_CONFIG_KEYS}")
    out: dict[str, Any] = {}
    for key, x in v.items():
        at = f"{where}.{_show(key) if not isinstance(key, str) else key[:64]}"
        if not isinstance(key, str) or _KEY.fullmatch(key) is None:
            raise CodecError(f"{at}: not a config key (letters, digits, '_')")
        if isinstance(x, dict):
            if depth >= MAX_CONFIG_DEPTH:
                raise CodecError(f"{at}: nested deeper than {MAX_CONFIG_DEPTH}")
            out[key] = _config(at, x, depth + 1)
        elif x is None or isinstance(x, bool):
            out[key] = x
        elif isinstance(x, int):
            out[key] = _int(-(2**63), 2**64 - 1)(at, x)
        elif isinstance(x, float):
            out[key] = _real(-1e300, 1e300)(at, x)
        elif isinstance(x, str):
            out[key] = _text(MAX_TEXT_CHARS)(at, x)
        else:
            raise CodecError(f"{at}: {_show(x)} is not a number, string, boolean or object")
    return out


class _Field(NamedTuple):
    parse: Callable[[str, Any], Any]
    required: bool = True


def _check_record(obj: Any, where: str, spec: Mapping[str, _Field]) -> dict[str, Any]:
    """A JSON object holding exactly the record's fields (optional ones may be absent or
    null), each parsed. Unknown keys are refused, not dropped: see Telemetry."""
    if not isinstance(obj, Mapping):
        raise CodecError(f"{where}: {_show(obj)} is not an object")
    unknown = [k for k in obj if k not in spec]
    if unknown:
        raise CodecError(f"{where}: unknown fields {_show(sorted(map(str, unknown)))}")
    out = {}
    for name, f in spec.items():
        if name not in obj or obj[name] is None:
            if f.required:
                raise CodecError(f"{where}.{name}: missing")
            out[name] = None
        else:
            out[name] = f.parse(f"{where}.{name}", obj[name])
    return out


class _Record:
    """A frozen, bounded record carried inside a message. Building one validates it; its JSON
    form omits optional fields that are None."""

    _spec: ClassVar[dict[str, _Field]]

    def __post_init__(self) -> None:
        checked = _check_record(self.__dict__, type(self).__name__, self._spec)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_json(cls, obj: Any, where: str | None = None) -> Any:
        checked = _check_record(obj, where or cls.__name__, cls._spec)
        return cls(**checked)

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True, kw_only=True)
class Telemetry(_Record):
    """What a device measured in a round (its Update's `telemetry`).

    Every field a device sends today is required except `threads` and `algorithm`, so code
    that reads telemetry never meets a missing key or a wrong type. Unknown keys are refused,
    not dropped: the protocol is strict like the rest of the header (an unknown meta field
    is refused too), so a device and server that disagree about telemetry are found at the
    first update and named, rather than one side silently losing what the other measures.
    """

    peak_rss_mb: float
    step_ms_median: float
    step_ms_mean: float
    round_s: float
    loss_first: float
    loss_last: float
    loss_mean: float
    steps: int
    smashed_sent: int
    threads: int | None = None
    algorithm: str | None = None
    bytes_in: int
    bytes_out: int

    _spec: ClassVar[dict[str, _Field]] = {
        "peak_rss_mb": _Field(_real(0, MAX_MB)),
        "step_ms_median": _Field(_real(0, MAX_MS)),
        "step_ms_mean": _Field(_real(0, MAX_MS)),
        "round_s": _Field(_real(0, MAX_MS)),
        "loss_first": _Field(_real(-MAX_LOSS, MAX_LOSS)),
        "loss_last": _Field(_real(-MAX_LOSS, MAX_LOSS)),
        "loss_mean": _Field(_real(-MAX_LOSS, MAX_LOSS)),
        "steps": _Field(_int(0, MAX_STEP)),
        "smashed_sent": _Field(_int(0, MAX_STEP)),
        "threads": _Field(_int(1, MAX_THREADS), required=False),
        "algorithm": _Field(_match(_NAME, "an algorithm name"), required=False),
        "bytes_in": _Field(_int(0, MAX_COUNT)),
        "bytes_out": _Field(_int(0, MAX_COUNT)),
    }


@dataclass(frozen=True, kw_only=True)
class JoinProfile(_Record):
    """What a device says about itself when it joins (its Join's `profile`).

    `samples` (its shard size: what its updates' sample counts may claim) and `algorithms`
    (what it can run) are required; the rest describes the board for the run's records and
    is optional. Unknown keys are refused, as in Telemetry.
    """

    samples: int
    python: str | None = None
    machine: str | None = None
    onnxruntime: str | None = None
    numpy: str | None = None
    threads: int | None = None
    rss_mb: float | None = None
    algorithms: tuple[str, ...]
    profile: str | None = None  # the board profile's name, "none" without one
    budget_mb: float | None = None  # the memory check made before joining, when it ran
    memory_mb: float | None = None
    memory_batch: int | None = None
    memory_extrapolated: bool | None = None
    max_batch_measured_fit: int | None = None

    _spec: ClassVar[dict[str, _Field]] = {
        "samples": _Field(_int(0, MAX_SAMPLES)),
        "python": _Field(_text(MAX_TEXT_CHARS), required=False),
        "machine": _Field(_text(MAX_TEXT_CHARS), required=False),
        "onnxruntime": _Field(_text(MAX_TEXT_CHARS), required=False),
        "numpy": _Field(_text(MAX_TEXT_CHARS), required=False),
        "threads": _Field(_int(1, MAX_THREADS), required=False),
        "rss_mb": _Field(_real(0, MAX_MB), required=False),
        "algorithms": _Field(lambda w, v: _names(w, v, 16)),
        "profile": _Field(_text(MAX_TEXT_CHARS), required=False),
        "budget_mb": _Field(_real(0, MAX_MB), required=False),
        "memory_mb": _Field(_real(0, MAX_MB), required=False),
        "memory_batch": _Field(_int(0, MAX_BATCH), required=False),
        "memory_extrapolated": _Field(_bool, required=False),
        "max_batch_measured_fit": _Field(_int(0, MAX_BATCH), required=False),
    }


def _names(where: str, v: Any, max_items: int) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= max_items:
        raise CodecError(f"{where}: expected a list of 1..{max_items} names")
    return tuple(_match(_NAME, "a name")(f"{where}[{i}]", x) for i, x in enumerate(v))


@dataclass(frozen=True, kw_only=True)
class ServerInfo(_Record):
    """The server's online presence `info`: what it runs, and `train`, the run's training
    config (`TrainConfig.to_json()`, as every round's start carries it), so that a device
    sizes its join-time memory check by the run's batch size before round 1 says it."""

    model: str
    cut: str
    dataset: str
    train: dict[str, Any] | None = None

    _spec: ClassVar[dict[str, _Field]] = {
        "model": _Field(_text(MAX_TEXT_CHARS)),
        "cut": _Field(_text(MAX_TEXT_CHARS)),
        "dataset": _Field(_text(MAX_TEXT_CHARS)),
        "train": _Field(_config, required=False),
    }


def server_info(model: str, cut: str, dataset: str, train: dict[str, Any]) -> ServerInfo:
    return ServerInfo(model=model, cut=cut, dataset=dataset, train=train)


def announced_train(info: Any) -> dict[str, Any] | None:
    """The training config in the server's presence `info` (a ServerInfo, or its JSON form);
    None from a server that does not announce it. Raises ValueError if it is there but not
    an object (the caller warns and ignores it)."""
    if isinstance(info, ServerInfo):
        return info.train
    train = info.get("train") if isinstance(info, dict) else None
    if train is not None and not isinstance(train, dict):
        raise ValueError(f"the server's presence has train = {train!r}, not an object")
    return train


def _nested(cls: type[_Record]) -> Callable[[str, Any], Any]:
    """A record inside a message: `{}` on the wire is "not given" (None), anything else must
    be the whole record."""
    def parse(where: str, v: Any) -> Any:
        if isinstance(v, Mapping) and not v:
            return None
        return cls.from_json(v, where)
    return parse


class _Array(NamedTuple):
    """What one array of a kind must be: dtype, number of dimensions, value bounds."""

    dtype: str
    ndim: tuple[int, int]  # min, max
    finite: bool = False
    nonneg: bool = False


_WEIGHTS = _Array("float32", (1, 1), finite=True)


# -- message kinds ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """Envelope shared by every kind; subclasses add their fields."""

    run_id: str
    round: int
    sender: str
    msg_id: str = field(default_factory=new_msg_id)
    kind: ClassVar[str] = "message"
    max_bytes: ClassVar[int] = 64 * 1024  # the largest encoding of this kind a receiver takes
    _arrays: ClassVar[dict[str, _Array]] = {}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {}

    def meta(self) -> dict[str, Any]:
        """JSON-able fields other than the envelope and the arrays."""
        out = {}
        for name in self._meta:
            v = getattr(self, name)
            if isinstance(v, _Record):
                v = v.to_json()
            elif isinstance(v, tuple):
                v = list(v)
            out[name] = {} if v is None and name in _RECORD_FIELDS else v
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._arrays}

    def _record(self, name: str, cls: type[_Record]) -> None:
        """Accept a record's JSON form (a dict) where the record goes; `{}` is None."""
        v = getattr(self, name)
        if isinstance(v, Mapping):
            object.__setattr__(self, name, cls.from_json(v, f"{self.kind}.{name}") if v else None)


_RECORD_FIELDS = ("info", "profile", "telemetry")


@dataclass(frozen=True)
class Presence(Message):
    """Retained device or server status; the offline variant is the device's last will.

    The server's online presence carries a ServerInfo in `info`; devices send none."""

    state: str = "online"  # online | offline
    info: ServerInfo | None = None
    kind: ClassVar[str] = "presence"
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "state": _choice("online", "offline"), "info": _nested(ServerInfo)}

    def __post_init__(self) -> None:
        self._record("info", ServerInfo)


@dataclass(frozen=True)
class Join(Message):
    """A device announcing itself; asks for the bundle unless it has one with this sha."""

    profile: JoinProfile | None = None
    bundle_sha256: str | None = None
    kind: ClassVar[str] = "join"
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "profile": _nested(JoinProfile),
        "bundle_sha256": _optional(_match(_SHA256, "a sha256 in lowercase hex"))}

    def __post_init__(self) -> None:
        self._record("profile", JoinProfile)


@dataclass(frozen=True)
class BundleFiles(Message):
    """The bundle's files as raw bytes; the device verifies them against the manifest."""

    names: tuple[str, ...] = ()
    blobs: tuple[np.ndarray, ...] = ()  # uint8, one per name
    kind: ClassVar[str] = "bundle"
    max_bytes: ClassVar[int] = MAX_MESSAGE_BYTES
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "names": lambda w, v: _file_names(w, v)}

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


def _file_names(where: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or len(v) > MAX_BUNDLE_FILES:
        raise CodecError(f"{where}: expected a list of at most {MAX_BUNDLE_FILES} file names")
    out = tuple(_match(_FILE, "a plain file name")(f"{where}[{i}]", x) for i, x in enumerate(v))
    if len(set(out)) != len(out):
        raise CodecError(f"{where}: names a file twice")
    return out


@dataclass(frozen=True)
class RoundStart(Message):
    """Global client+aux weights, the participants and the training config for the round."""

    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    participants: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    bundle_sha256: str = ""
    kind: ClassVar[str] = "round"
    max_bytes: ClassVar[int] = 256 * 1024 * 1024
    _arrays: ClassVar[dict[str, _Array]] = {"weights": _WEIGHTS}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "participants": _id_list(MAX_PARTICIPANTS), "config": _config,
        "bundle_sha256": _match(re.compile(r"|[0-9a-f]{64}"), "a sha256 in lowercase hex")}


@dataclass(frozen=True)
class Smashed(Message):
    """Cut-layer activations of one batch with its labels, for the server's FO step."""

    step: int = 0
    activations: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    kind: ClassVar[str] = "smashed"
    max_bytes: ClassVar[int] = 128 * 1024 * 1024
    _arrays: ClassVar[dict[str, _Array]] = {
        "activations": _Array("float32", (1, MAX_NDIM), finite=True),
        "labels": _Array("int64", (1, 1), nonneg=True)}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {"step": _int(0, MAX_STEP)}


@dataclass(frozen=True)
class Gradient(Message):
    """SplitFed only: the server's dL/d(smashed) for one uploaded step, and its loss."""

    step: int = 0
    grad: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    loss: float = 0.0
    kind: ClassVar[str] = "grad"
    max_bytes: ClassVar[int] = 128 * 1024 * 1024
    _arrays: ClassVar[dict[str, _Array]] = {
        "grad": _Array("float32", (1, MAX_NDIM), finite=True)}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "step": _int(0, MAX_STEP), "loss": _real(-MAX_LOSS, MAX_LOSS)}


@dataclass(frozen=True)
class Update(Message):
    """Round-end device weights, sample count, telemetry and the round's ZO log."""

    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    num_samples: int = 1
    telemetry: Telemetry | None = None
    zo_seeds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    zo_grads: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    kind: ClassVar[str] = "update"
    max_bytes: ClassVar[int] = 256 * 1024 * 1024
    _arrays: ClassVar[dict[str, _Array]] = {
        "weights": _WEIGHTS, "zo_seeds": _Array("uint64", (1, 1)),
        "zo_grads": _Array("float32", (1, 1), finite=True)}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "num_samples": _int(1, MAX_SAMPLES), "telemetry": _nested(Telemetry)}

    def __post_init__(self) -> None:
        self._record("telemetry", Telemetry)


def _clean_text(text: str, max_chars: int) -> str:
    """What a sender does to free text so that the receiver's bounds always hold."""
    text = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in str(text))
    return text if len(text) <= max_chars else text[:max_chars - 3] + "..."


@dataclass(frozen=True)
class DeviceError(Message):
    """A device reporting a problem it cannot fix itself (errors travel as messages).
    Longer text is cut to MAX_ERROR_CHARS when the message is built."""

    error: str = ""
    kind: ClassVar[str] = "error"
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {"error": _text(MAX_ERROR_CHARS)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", _clean_text(self.error, MAX_ERROR_CHARS))


@dataclass(frozen=True)
class Stop(Message):
    reason: str = ""
    kind: ClassVar[str] = "stop"
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {"reason": _text(MAX_REASON_CHARS)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", _clean_text(self.reason, MAX_REASON_CHARS))


KINDS: dict[str, type[Message]] = {
    cls.kind: cls for cls in (Presence, Join, BundleFiles, RoundStart, Smashed, Gradient,
                              Update, DeviceError, Stop)
}


def max_bytes(kind: str | None) -> int:
    """The largest encoded message of `kind` a receiver accepts (any kind's if None)."""
    cls = KINDS.get(kind) if kind is not None else None
    return cls.max_bytes if cls is not None else MAX_MESSAGE_BYTES


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
    "run_id": _match(_RUN_ID, "a run id (0-64 letters, digits, '_', '.', '-')"),
    "round": _int(-1, MAX_ROUND),
    "sender": _match(is_id, "a device id or 'server'"),
    "msg_id": _match(_MSG_ID, "a message id (32 lowercase hex digits)"),
}


def decode(data: bytes | bytearray | memoryview) -> Message:
    """bytes → Message, with every field typed and bounded; raises CodecError, never
    anything else."""
    try:
        return _decode(memoryview(data))
    except CodecError:
        raise
    except Exception as exc:  # a check this module forgot; still never a crash
        raise _UnexpectedInput(f"malformed message: {type(exc).__name__}: {exc}") from exc


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
        raise CodecError(f"unsupported header version {_show(header.get('v'))}")
    kind = header.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CodecError(f"unknown message kind {_show(kind)}")
    if set(header) != _HEADER_KEYS:
        missing, extra = _HEADER_KEYS - set(header), set(header) - _HEADER_KEYS
        raise CodecError(f"{kind} header: missing {sorted(missing)}, unknown "
                         f"{_show(sorted(extra))}")
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
                         f"{_show(sorted(extra))}")
    values = {k: parse(f"{kind}.{k}", meta[k]) for k, parse in cls._meta.items()}
    specs = ({f"file{i}": _Array("uint8", (1, 1)) for i in range(len(values["names"]))}
             if cls is BundleFiles else cls._arrays)
    arrays = _read_arrays(view, 8 + hlen, header["arrays"], specs, kind)
    if cls is BundleFiles:
        return BundleFiles(**env, names=values["names"], blobs=tuple(arrays.values()))
    _check_together(kind, arrays)
    return cls(**env, **values, **arrays)


def _read_arrays(view: memoryview, pos: int, table: Any, specs: Mapping[str, _Array],
                 kind: str) -> dict[str, np.ndarray]:
    """The arrays `table` describes, each checked against its spec before its bytes are
    touched (dtype, dimensions, size) and after (finite, non-negative)."""
    if not isinstance(table, list) or len(table) != len(specs):
        raise CodecError(f"{kind} message needs arrays {sorted(specs)}, got a table of "
                         f"{len(table) if isinstance(table, list) else _show(table)}")
    out: dict[str, np.ndarray] = {}
    for entry in table:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise CodecError(f"{kind}.arrays: an entry is not {{name, dtype, shape}}")
        name = entry["name"]
        if not isinstance(name, str) or name not in specs or name in out:
            raise CodecError(f"{kind}.arrays: unexpected or repeated array {_show(name)}; "
                             f"needs {sorted(specs)}")
        spec, where = specs[name], f"{kind}.{name}"
        if entry["dtype"] != spec.dtype:
            raise CodecError(f"{where}: dtype {_show(entry['dtype'])}, expected {spec.dtype}")
        shape = entry["shape"]
        if not isinstance(shape, list) or not spec.ndim[0] <= len(shape) <= spec.ndim[1]:
            raise CodecError(f"{where}: shape {_show(shape)} is not a list of "
                             f"{spec.ndim[0]}..{spec.ndim[1]} dimensions")
        dims = tuple(_int(0, MAX_MESSAGE_BYTES)(f"{where}.shape", s) for s in shape)
        dt = np.dtype(DTYPES[spec.dtype])
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


def _check_together(kind: str, arrays: dict[str, np.ndarray]) -> None:
    """Bounds that tie one array of a kind to another."""
    if kind == "smashed":
        batch = arrays["activations"].shape[0]
        if batch < 1 or arrays["labels"].shape != (batch,):
            raise CodecError(f"smashed.labels: shape {arrays['labels'].shape} for activations "
                             f"of shape {arrays['activations'].shape}; expected ({batch},) "
                             "and a batch of at least 1")
    elif kind == "grad" and arrays["grad"].shape[0] < 1:
        raise CodecError("grad.grad: an empty batch")
    elif kind == "update" and arrays["zo_grads"].shape != arrays["zo_seeds"].shape:
        raise CodecError(f"update.zo_grads: {arrays['zo_grads'].size} values for "
                         f"{arrays['zo_seeds'].size} seeds")


# -- chunking and reassembly ---------------------------------------------------------------

def chunk(payload: bytes, msg_id: str, max_payload: int = MAX_CHUNK_PAYLOAD) -> list[bytes]:
    """Split an encoded message into MQTT payloads of at most `max_payload` bytes each."""
    per = max_payload - _CHUNK_HEAD.size
    if per <= 0:
        raise ValueError("max_payload is smaller than the chunk header")
    count = max(1, -(-len(payload) // per))
    mid = uuid.UUID(hex=msg_id).bytes
    return [_CHUNK_HEAD.pack(CHUNK_MAGIC, mid, i, count, len(payload)) +
            payload[i * per:(i + 1) * per] for i in range(count)]


PIECE_OVERHEAD = 64  # bytes booked per received chunk on top of its data (its index entry)
PARTIAL_OVERHEAD = 4096  # bytes booked per pending message (its mapping, its bookkeeping)


@dataclass
class _Partial:
    """A message being rebuilt: each piece is copied into `data` at its offset as it
    arrives, so a large message costs its own size once, not pieces plus their join."""

    count: int
    total: int
    per: int  # bytes in every piece but the last (chunk's split)
    first_seen: float
    data: mmap.mmap | bytearray = field(default_factory=bytearray)  # anonymous mmap: pages
    # become memory only as pieces are written into them (a bare header cannot make the
    # receiver allocate a message's size)
    have: set[int] = field(default_factory=set)
    booked: int = PARTIAL_OVERHEAD  # what it holds: received pieces plus overheads

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
        return _Partial(count, total, per, now)

    def want(self, index: int) -> int:
        return self.per if index < self.count - 1 else self.total - self.per * (self.count - 1)

    def allocate(self) -> None:
        if self.total:
            try:
                self.data = mmap.mmap(-1, self.total)
            except (OSError, ValueError, OverflowError) as exc:
                raise CodecError(f"cannot map {self.total} bytes for a message: {exc}") from None

    def put(self, index: int, piece: bytes) -> None:
        self.data[index * self.per:index * self.per + len(piece)] = piece
        self.have.add(index)
        self.booked += len(piece) + PIECE_OVERHEAD


class Reassembler:
    """Rebuilds messages from chunks that may arrive duplicated or out of order.

    Keyed by (topic, message id) so one sender cannot complete another's message; a topic
    is one sender's (the broker's ACL lets a device publish only on its own), so budgets are
    kept per topic and count what was actually received, never what a header declares:

    - a message's declared size must be within its kind's limit (`max_bytes(kind)`, when
      the caller knows the kind from the topic);
    - a topic holds at most `max_topic_messages` incomplete messages and twice its kind's
      limit in received bytes; past that, its own oldest incomplete message is dropped;
    - all topics together hold at most `max_pending_messages` and `max_pending_bytes`; past
      that, the topic holding the most loses its oldest incomplete message, so a sender
      filling the budget evicts itself, not the others. If that is the message the chunk
      belongs to, the chunk is refused (CodecError).

    Incomplete messages are dropped after `timeout_s` (counted in `expired`; budget drops in
    `evicted`); completed ids are remembered per topic (the last `remember`) so a QoS 1
    redelivery of a whole message is applied once (counted in `duplicates`).
    """

    def __init__(self, timeout_s: float = 120.0, max_pending_bytes: int = 2 * MAX_MESSAGE_BYTES,
                 remember: int = 256, *, max_topic_messages: int = 4,
                 max_pending_messages: int = 1024, max_topics_remembered: int = 16_384,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = min(max_message_bytes, MAX_MESSAGE_BYTES)
        self.timeout_s = timeout_s
        self.max_pending_bytes = max_pending_bytes
        self.max_topic_messages = max_topic_messages
        self.max_pending_messages = max_pending_messages
        self._pending: dict[tuple[str, bytes], _Partial] = {}  # oldest first
        self._done: OrderedDict[str, OrderedDict[bytes, None]] = OrderedDict()
        self._remember = remember
        self._max_topics = max_topics_remembered
        self.duplicates = 0
        self.expired = 0
        self.evicted = 0
        self._dropped: dict[str, int] = {}  # topic -> incomplete messages dropped (take_dropped)

    def add(self, topic: str, payload: bytes, now: float | None = None,
            kind: str | None = None) -> memoryview | None:
        """Feed one MQTT payload; returns the whole message once its last chunk arrives.
        `kind`: the message kind the topic carries, if known (its size limit applies)."""
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
        limit = max_bytes(kind)
        if total > limit:
            raise CodecError(f"{kind} message of {total} bytes exceeds the {kind} limit of "
                             f"{limit}")
        key = (topic, mid)
        done = self._done.get(topic)
        if done is not None and mid in done:
            self.duplicates += 1
            return None
        piece = payload[_CHUNK_HEAD.size:]
        part = self._pending.get(key)
        if part is None:
            part = _Partial.first(count, total, index, len(piece), now)
        elif part.count != count or part.total != total:
            raise CodecError("chunk header disagrees with earlier chunks of the message")
        if index in part.have:
            self.duplicates += 1
            return None
        if len(piece) != part.want(index):
            raise CodecError(f"chunk {index} has {len(piece)} bytes, expected "
                             f"{part.want(index)}")
        if key not in self._pending:
            part.allocate()
            self._pending[key] = part
        self._make_room(key, len(piece) + PIECE_OVERHEAD, 2 * limit)
        part.put(index, piece)
        if len(part.have) < part.count:
            return None
        del self._pending[key]
        self._remember_done(topic, mid)
        return memoryview(part.data)  # compares equal to the bytes sent; arrays may view it

    def pending_bytes(self, topic: str | None = None) -> int:
        """Bytes booked by incomplete messages (of one topic, or all): what was received
        plus overheads, never the sizes their headers declare."""
        return sum(p.booked for (t, _), p in self._pending.items() if topic in (None, t))

    def pending_by_topic(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t, _ in self._pending:
            counts[t] = counts.get(t, 0) + 1
        return counts

    def pending_messages(self, topic: str | None = None) -> int:
        return sum(1 for t, _ in self._pending if topic in (None, t))

    def _make_room(self, key: tuple[str, bytes], cost: int, topic_budget: int) -> None:
        """Drop incomplete messages until `cost` more bytes for `key` fit every budget."""
        topic = key[0]
        while True:
            if self.pending_messages(topic) > self.max_topic_messages or \
                    self.pending_bytes(topic) + cost > topic_budget:
                self._evict(topic, key, "its topic's budget")
            elif len(self._pending) > self.max_pending_messages:
                self._evict(self._largest(lambda p: 1), key, "the pending-message budget")
            elif self.pending_bytes() + cost > self.max_pending_bytes:
                self._evict(self._largest(lambda p: p.booked), key, "the pending-byte budget")
            else:
                return

    def _largest(self, weight: Callable[[_Partial], int]) -> str:
        held: dict[str, int] = {}
        for (t, _), p in self._pending.items():
            held[t] = held.get(t, 0) + weight(p)
        return max(held, key=lambda t: held[t])

    def _evict(self, topic: str, key: tuple[str, bytes], budget: str) -> None:
        oldest = next(k for k in self._pending if k[0] == topic)
        del self._pending[oldest]
        if oldest == key:
            raise CodecError(f"incomplete messages pending on {topic} exceed {budget}; "
                             "dropping this message")
        self.evicted += 1
        self._note_dropped(topic)

    def _note_dropped(self, topic: str) -> None:
        if len(self._dropped) < self._max_topics or topic in self._dropped:
            self._dropped[topic] = self._dropped.get(topic, 0) + 1

    def take_dropped(self) -> dict[str, int]:
        """Incomplete messages dropped (expired or evicted) per topic since the last call,
        so that the receiver can count them against their sender."""
        dropped, self._dropped = self._dropped, {}
        return dropped

    def _remember_done(self, topic: str, mid: bytes) -> None:
        done = self._done.pop(topic, None) or OrderedDict()
        self._done[topic] = done  # most recently used topic last
        done[mid] = None
        while len(done) > self._remember:
            done.popitem(last=False)
        while len(self._done) > self._max_topics:
            self._done.popitem(last=False)

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self._pending.items() if now - p.first_seen > self.timeout_s]:
            del self._pending[key]
            self.expired += 1
            self._note_dropped(key[0])
