"""The message kinds: frozen dataclasses sharing one envelope (run id, round, sender,
message id), each with the bounds its fields and arrays are decoded with (`codec.decode`).

Messages are not checked when built (the receiver is the boundary: a test must be able to
send a NaN), but their nested records validate themselves and free text is cut to what a
receiver takes. Size limits are per kind (`Message.max_bytes`, `max_bytes(kind)`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np

from edge_runtime.protocol.fields import (
    MAX_ERROR_CHARS,
    MAX_LOSS,
    MAX_MESSAGE_BYTES,
    MAX_NDIM,
    MAX_PARTICIPANTS,
    MAX_REASON_CHARS,
    MAX_SAMPLES,
    MAX_STEP,
    SHA256,
    WEIGHTS_HASH,
    choice,
    clean_text,
    config_object,
    file_names,
    free_text,
    id_list,
    integer,
    matching,
    optional,
    real,
)
from edge_runtime.protocol.records import JoinProfile, Record, ServerInfo, Telemetry, nested
from edge_runtime.protocol.smashed_codec import CODECS
from edge_runtime.protocol.smashed_codec import decode as decode_smashed
from edge_runtime.protocol.smashed_codec import encode as encode_smashed


def new_msg_id() -> str:
    return uuid.uuid4().hex


class ArraySpec(NamedTuple):
    """What one array of a kind must be: dtype, number of dimensions, value bounds."""

    dtype: str
    ndim: tuple[int, int]  # min, max
    finite: bool = False
    nonneg: bool = False
    also: tuple[str, ...] = ()  # other dtypes it may have (a smashed codec's)


WEIGHTS = ArraySpec("float32", (1, 1), finite=True)


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
    _arrays: ClassVar[dict[str, ArraySpec]] = {}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {}

    def meta(self) -> dict[str, Any]:
        """JSON-able fields other than the envelope and the arrays."""
        out = {}
        for name in self._meta:
            v = getattr(self, name)
            if isinstance(v, Record):
                v = v.to_json()
            elif isinstance(v, tuple):
                v = list(v)
            out[name] = {} if v is None and name in RECORD_FIELDS else v
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._arrays}

    def _record(self, name: str, cls: type[Record]) -> None:
        """Accept a record's JSON form (a dict) where the record goes; `{}` is None."""
        v = getattr(self, name)
        if isinstance(v, Mapping):
            object.__setattr__(self, name, cls.from_json(v, f"{self.kind}.{name}") if v else None)


RECORD_FIELDS = ("info", "profile", "telemetry")


@dataclass(frozen=True)
class Presence(Message):
    """Retained device or server status; the offline variant is the device's last will.

    The server's online presence carries a ServerInfo in `info`; devices send none."""

    state: str = "online"  # online | offline
    info: ServerInfo | None = None
    kind: ClassVar[str] = "presence"
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "state": choice("online", "offline"), "info": nested(ServerInfo)}

    def __post_init__(self) -> None:
        self._record("info", ServerInfo)


@dataclass(frozen=True)
class Join(Message):
    """A device announcing itself; asks for the bundle unless it has one with this sha."""

    profile: JoinProfile | None = None
    bundle_sha256: str | None = None
    kind: ClassVar[str] = "join"
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "profile": nested(JoinProfile),
        "bundle_sha256": optional(matching(SHA256, "a sha256 in lowercase hex"))}

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
        "names": lambda w, v: file_names(w, v)}

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
    max_bytes: ClassVar[int] = 256 * 1024 * 1024
    _arrays: ClassVar[dict[str, ArraySpec]] = {"weights": WEIGHTS}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "participants": id_list(MAX_PARTICIPANTS), "config": config_object,
        "bundle_sha256": matching(re.compile(r"|[0-9a-f]{64}"), "a sha256 in lowercase hex")}


@dataclass(frozen=True)
class Smashed(Message):
    """Cut-layer activations of one batch with its labels, for the server's FO step, coded
    by `codec` (`smashed_codec`: float32, float16, or uint8 with per-channel `scale` and
    `offset`; those two are empty for the others). `decoded()` gives float32 back."""

    step: int = 0
    activations: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    codec: str = "fp32"
    scale: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    kind: ClassVar[str] = "smashed"
    max_bytes: ClassVar[int] = 128 * 1024 * 1024
    _arrays: ClassVar[dict[str, ArraySpec]] = {
        "activations": ArraySpec("float32", (1, MAX_NDIM), finite=True,
                                 also=("float16", "uint8")),
        "labels": ArraySpec("int64", (1, 1), nonneg=True),
        "scale": ArraySpec("float32", (1, 1), finite=True),
        "offset": ArraySpec("float32", (1, 1), finite=True)}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "step": integer(0, MAX_STEP), "codec": choice(*CODECS)}

    @staticmethod
    def coded(run_id: str, round_: int, sender: str, step: int, activations: np.ndarray,
              labels: np.ndarray, codec: str) -> Smashed:
        """The message for float32 `activations` under `codec` (SmashedCodecError if they
        do not fit it)."""
        enc = encode_smashed(activations, codec)
        return Smashed(run_id, round_, sender, step=step, activations=enc.data,
                       labels=labels, codec=codec, scale=enc.scale, offset=enc.offset)

    def decoded(self) -> np.ndarray:
        """The activations as float32 (SmashedCodecError for an encoding that is not
        valid; `codec.decode` has already refused those)."""
        return decode_smashed(self.codec, self.activations, self.scale, self.offset)


@dataclass(frozen=True)
class Gradient(Message):
    """SplitFed only: the server's dL/d(smashed) for one uploaded step, and its loss."""

    step: int = 0
    grad: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    loss: float = 0.0
    kind: ClassVar[str] = "grad"
    max_bytes: ClassVar[int] = 128 * 1024 * 1024
    _arrays: ClassVar[dict[str, ArraySpec]] = {
        "grad": ArraySpec("float32", (1, MAX_NDIM), finite=True)}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "step": integer(0, MAX_STEP), "loss": real(-MAX_LOSS, MAX_LOSS)}


@dataclass(frozen=True)
class Update(Message):
    """Round-end device weights, sample count and telemetry.

    With `--device-sync replay` the weights are empty and the round's ZO log stands in for
    them: one (seed, projected gradient) per step and direction, and `weights_hash`
    (`edge_runtime.replay.weights_hash`) of the weights the device ended with, which the
    server checks its replay against. Exactly one of the two forms (codec `_check_together`).
    Devices of an algorithm that never trains (`frozen`) send neither: the update is their
    sample count and telemetry, and stands for the round's starting weights.
    """

    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    num_samples: int = 1
    telemetry: Telemetry | None = None
    seeds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    projected: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    weights_hash: str | None = None
    kind: ClassVar[str] = "update"
    max_bytes: ClassVar[int] = 256 * 1024 * 1024
    _arrays: ClassVar[dict[str, ArraySpec]] = {
        "weights": WEIGHTS, "seeds": ArraySpec("uint64", (1, 1)), "projected": WEIGHTS}
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "num_samples": integer(1, MAX_SAMPLES), "telemetry": nested(Telemetry),
        "weights_hash": optional(matching(WEIGHTS_HASH, "32 lowercase hex digits"))}

    def __post_init__(self) -> None:
        self._record("telemetry", Telemetry)


@dataclass(frozen=True)
class WeightsRequest(Message):
    """`--device-sync replay`, server to one device: its update for this round did not replay
    to its hash, so send the round's weights themselves (a `WeightsReply`); `reason` says
    why, for the device's log."""

    reason: str = ""
    kind: ClassVar[str] = "weights_request"
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {"reason": free_text(MAX_REASON_CHARS)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", clean_text(self.reason, MAX_REASON_CHARS))


@dataclass(frozen=True)
class WeightsReply(Message):
    """The answer to a `WeightsRequest`: the device's end-of-round weights for that round,
    which the server checks like any weights update (its sample count and telemetry came
    with the update whose log did not replay)."""

    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    kind: ClassVar[str] = "weights_reply"
    max_bytes: ClassVar[int] = Update.max_bytes
    _arrays: ClassVar[dict[str, ArraySpec]] = {"weights": WEIGHTS}


@dataclass(frozen=True)
class DeviceError(Message):
    """A device reporting a problem it cannot fix itself (errors travel as messages).
    Longer text is cut to MAX_ERROR_CHARS when the message is built."""

    error: str = ""
    kind: ClassVar[str] = "error"
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {"error": free_text(MAX_ERROR_CHARS)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", clean_text(self.error, MAX_ERROR_CHARS))


@dataclass(frozen=True)
class Stop(Message):
    reason: str = ""
    kind: ClassVar[str] = "stop"
    _meta: ClassVar[dict[str, Callable[[str, Any], Any]]] = {"reason": free_text(MAX_REASON_CHARS)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", clean_text(self.reason, MAX_REASON_CHARS))


KINDS: dict[str, type[Message]] = {
    cls.kind: cls for cls in (Presence, Join, BundleFiles, RoundStart, Smashed, Gradient,
                              Update, WeightsRequest, WeightsReply, DeviceError, Stop)
}


def max_bytes(kind: str | None) -> int:
    """The largest encoded message of `kind` a receiver accepts (any kind's if None)."""
    cls = KINDS.get(kind) if kind is not None else None
    return cls.max_bytes if cls is not None else MAX_MESSAGE_BYTES

