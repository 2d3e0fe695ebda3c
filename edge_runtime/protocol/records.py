"""Typed records carried inside messages: a device's telemetry and join profile, the
server's presence info. Building one validates it, so a sender cannot build one its receiver
would refuse."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from edge_runtime.protocol.fields import (
    MAX_BATCH,
    MAX_COUNT,
    MAX_LOSS,
    MAX_MB,
    MAX_MS,
    MAX_SAMPLES,
    MAX_STEP,
    MAX_TEXT_CHARS,
    MAX_THREADS,
    NAME,
    Field,
    boolean,
    check_record,
    config_object,
    free_text,
    integer,
    matching,
    name_list,
    real,
)


class Record:
    """A frozen, bounded record carried inside a message. Building one validates it; its JSON
    form omits optional fields that are None."""

    _spec: ClassVar[dict[str, Field]]

    def __post_init__(self) -> None:
        checked = check_record(self.__dict__, type(self).__name__, self._spec)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_json(cls, obj: Any, where: str | None = None) -> Any:
        checked = check_record(obj, where or cls.__name__, cls._spec)
        return cls(**checked)

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True, kw_only=True)
class Telemetry(Record):
    """What a device measured in a round (its Update's `telemetry`).

    Every field is required except `threads` and `algorithm`, so code
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

    _spec: ClassVar[dict[str, Field]] = {
        "peak_rss_mb": Field(real(0, MAX_MB)),
        "step_ms_median": Field(real(0, MAX_MS)),
        "step_ms_mean": Field(real(0, MAX_MS)),
        "round_s": Field(real(0, MAX_MS)),
        "loss_first": Field(real(-MAX_LOSS, MAX_LOSS)),
        "loss_last": Field(real(-MAX_LOSS, MAX_LOSS)),
        "loss_mean": Field(real(-MAX_LOSS, MAX_LOSS)),
        "steps": Field(integer(0, MAX_STEP)),
        "smashed_sent": Field(integer(0, MAX_STEP)),
        "threads": Field(integer(1, MAX_THREADS), required=False),
        "algorithm": Field(matching(NAME, "an algorithm name"), required=False),
        "bytes_in": Field(integer(0, MAX_COUNT)),
        "bytes_out": Field(integer(0, MAX_COUNT)),
    }


@dataclass(frozen=True, kw_only=True)
class JoinProfile(Record):
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

    _spec: ClassVar[dict[str, Field]] = {
        "samples": Field(integer(0, MAX_SAMPLES)),
        "python": Field(free_text(MAX_TEXT_CHARS), required=False),
        "machine": Field(free_text(MAX_TEXT_CHARS), required=False),
        "onnxruntime": Field(free_text(MAX_TEXT_CHARS), required=False),
        "numpy": Field(free_text(MAX_TEXT_CHARS), required=False),
        "threads": Field(integer(1, MAX_THREADS), required=False),
        "rss_mb": Field(real(0, MAX_MB), required=False),
        "algorithms": Field(lambda w, v: name_list(w, v, 16)),
        "profile": Field(free_text(MAX_TEXT_CHARS), required=False),
        "budget_mb": Field(real(0, MAX_MB), required=False),
        "memory_mb": Field(real(0, MAX_MB), required=False),
        "memory_batch": Field(integer(0, MAX_BATCH), required=False),
        "memory_extrapolated": Field(boolean, required=False),
        "max_batch_measured_fit": Field(integer(0, MAX_BATCH), required=False),
    }


@dataclass(frozen=True, kw_only=True)
class ServerInfo(Record):
    """The server's online presence `info`: what it runs, and `train`, the run's training
    config (`TrainConfig.to_json()`, as every round's start carries it), so that a device
    sizes its join-time memory check by the run's batch size before round 1 says it."""

    model: str
    cut: str
    dataset: str
    train: dict[str, Any] | None = None

    _spec: ClassVar[dict[str, Field]] = {
        "model": Field(free_text(MAX_TEXT_CHARS)),
        "cut": Field(free_text(MAX_TEXT_CHARS)),
        "dataset": Field(free_text(MAX_TEXT_CHARS)),
        "train": Field(config_object, required=False),
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


def nested(cls: type[Record]) -> Callable[[str, Any], Any]:
    """A record inside a message: `{}` on the wire is "not given" (None), anything else must
    be the whole record."""
    def parse(where: str, v: Any) -> Any:
        if isinstance(v, Mapping) and not v:
            return None
        return cls.from_json(v, where)
    return parse


