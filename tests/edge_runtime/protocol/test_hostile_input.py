"""A provisioned device publishing hostile but well-formed messages on its own topics.

Three attacks found against the server (issue 14) and the bounds that stop them, each at the
codec, the one boundary every payload passes:
1. a chunk declaring a huge message booked its whole size in a budget shared by every topic,
   so a few dozen bytes blocked every other device's messages until they expired;
2. a sample count that was not a finite, bounded integer (NaN, inf, 1e308, true, 2.5) passed
   and turned the weighted average into NaN;
3. telemetry missing a field or of the wrong type crashed the server where it read it.
Then every other field of every kind, and a property-based fuzz of all of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.protocol import (
    MAGIC,
    MAX_CHUNK_PAYLOAD,
    PARTIAL_OVERHEAD,
    PIECE_OVERHEAD,
    BundleFiles,
    CodecError,
    DeviceError,
    Gradient,
    Join,
    JoinProfile,
    Message,
    Presence,
    Reassembler,
    RoundStart,
    ServerInfo,
    Smashed,
    Stop,
    Telemetry,
    TrainConfig,
    Update,
    chunk,
    decode,
    encode,
    max_bytes,
    new_msg_id,
    topics,
)

CHUNK_HEAD = struct.Struct("<4s16sIIQ")
RUN = "a1b2c3d4e5f6"
TELEMETRY: dict[str, Any] = {
    "peak_rss_mb": 80.0, "step_ms_median": 1.5, "step_ms_mean": 2.0, "round_s": 3.25,
    "loss_first": 2.3, "loss_last": 1.25, "loss_mean": 1.5, "steps": 40, "smashed_sent": 20,
    "threads": 2, "algorithm": "heron", "bytes_in": 123_456, "bytes_out": 7_890}
PROFILE: dict[str, Any] = {
    "samples": 120, "python": "3.11.7", "machine": "aarch64", "onnxruntime": "1.20.1",
    "numpy": "2.1.0", "threads": 4, "rss_mb": 41.5, "algorithms": ["heron", "frozen"],
    "profile": "rpi4", "budget_mb": 3000.0, "memory_mb": 181.2, "memory_batch": 32,
    "memory_extrapolated": False, "max_batch_measured_fit": 32}
TRAIN = TrainConfig().to_json()


def _update(dev: str = "dev-0", d: int = 10, **kw: Any) -> Update:
    fields = {"weights": np.zeros(d, np.float32), "num_samples": 100, "telemetry": TELEMETRY,
              **kw}
    return Update(RUN, 3, dev, **fields)


def _edit(raw: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """`raw` re-encoded after editing its header JSON (NaN and Infinity written as Python's
    json writes them, which is what a hostile sender would do)."""
    (hlen,) = struct.unpack("<I", raw[4:8])
    header = json.loads(raw[8:8 + hlen])
    edit(header)
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + raw[8 + hlen:]


def _set_meta(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        obj = h["meta"]
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


def _del_meta(path: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        obj = h["meta"]
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]
    return edit


# -- 1. one sender's declared sizes cannot block another sender -------------------------------

def _declaring(total: int, mid: bytes, body: bytes = b"x" * 10) -> bytes:
    """A last chunk of two: `body` now, a first piece of `total - len(body)` bytes 'later'."""
    return CHUNK_HEAD.pack(b"HRC1", mid, 1, 2, total) + body


def _feed(re: Reassembler, topic: str, raw: bytes, mid: str, now: float = 0.0) -> Any:
    out = None
    for part in chunk(raw, mid):
        out = re.add(topic, part, now=now, kind=topics.payload_kind(topic))
    return out


def test_a_huge_declared_message_does_not_block_an_honest_senders_message() -> None:
    re = Reassembler()  # the server's budgets
    evil = [topics.up(f"evil-{i}", kind) for i in range(8) for kind in ("update", "smashed")]
    sent = 0
    for topic in evil:  # a few dozen bytes each, declaring the largest message of the kind
        for n in range(10):
            payload = _declaring(max_bytes(topics.payload_kind(topic)),
                                 bytes([n]) + b"\0" * 15)
            sent += len(payload)
            assert re.add(topic, payload, now=0.0, kind=topics.payload_kind(topic)) is None
    assert sent < 20_000
    # booked: what arrived, plus overheads -- not the 6 GB declared; 4 pending per topic
    assert re.pending_bytes() <= len(evil) * 4 * (PARTIAL_OVERHEAD + PIECE_OVERHEAD + 10)
    assert re.pending_messages(evil[0]) == re.max_topic_messages

    honest = _update(d=750_000)  # 3 MB: four chunks
    raw = encode(honest)
    out = _feed(re, topics.up("dev-0", "update"), raw, honest.msg_id, now=1.0)
    assert out == raw
    got = decode(out)
    assert isinstance(got, Update) and got.sender == "dev-0"


def test_a_sender_filling_the_global_budget_evicts_itself_not_a_smaller_sender() -> None:
    re = Reassembler(max_pending_bytes=6 * MAX_CHUNK_PAYLOAD)
    hog = topics.up("evil", "update")
    parts = chunk(bytes(40 * MAX_CHUNK_PAYLOAD), new_msg_id())  # bytes sent, not declared
    refused = 0

    def hog_sends(n: int) -> None:
        nonlocal refused
        for _ in range(n):
            try:
                re.add(hog, parts.pop(0), now=0.0, kind="update")
            except CodecError as exc:  # its own message no longer fits: refused, not ours
                assert "heron/up/evil/update" in str(exc)
                refused += 1

    hog_sends(10)  # the budget is full of the hog's bytes before the honest sender starts
    honest = _update(d=375_000)  # 1.5 MB: two chunks
    raw = encode(honest)
    first, last = chunk(raw, honest.msg_id)
    assert re.add(topics.up("dev-0", "update"), first, now=0.0, kind="update") is None
    hog_sends(10)
    assert re.add(topics.up("dev-0", "update"), last, now=0.0, kind="update") == raw
    assert refused >= 2 and re.pending_bytes() <= re.max_pending_bytes


def test_a_declared_size_over_the_kinds_limit_is_refused_at_the_first_chunk() -> None:
    re = Reassembler()
    for kind, topic in (("join", topics.up("dev-0", "join")),
                        ("error", topics.up("dev-0", "error")),
                        ("presence", topics.device_status("dev-0")),
                        ("smashed", topics.up("dev-0", "smashed")),
                        ("update", topics.up("dev-0", "update"))):
        assert topics.payload_kind(topic) == kind
        with pytest.raises(CodecError, match=f"{kind} message of .* exceeds the {kind} limit"):
            re.add(topic, _declaring(max_bytes(kind) + 1, b"\1" * 16), kind=kind)
    assert re.pending_messages() == 0


def test_decode_refuses_a_message_larger_than_its_kinds_limit() -> None:
    raw = encode(Join(RUN, 1, "dev-0", profile=PROFILE, bundle_sha256=None))
    with pytest.raises(CodecError, match=r"^join message of \d+ bytes exceeds the join limit"):
        decode(raw + bytes(max_bytes("join")))


def test_payload_kind_reads_every_topic_of_ours() -> None:
    p = "fleet/a"
    for kind in topics.UP_KINDS:
        assert topics.payload_kind(topics.up("status", kind, p)) == kind
    for kind in topics.DOWN_DEVICE_KINDS:
        assert topics.payload_kind(topics.down_device("up", kind, p)) == kind
    for kind in topics.DOWN_ALL_KINDS:
        assert topics.payload_kind(topics.down_all(kind, p)) == kind
    assert topics.payload_kind(topics.server_status(p)) == "presence"
    assert topics.payload_kind(topics.device_status("status", p)) == "presence"
    assert topics.payload_kind("elsewhere") is None


# -- 2. numbers that are not finite and bounded ----------------------------------------------

HOSTILE_COUNTS = [float("nan"), float("inf"), -float("inf"), 1e308, 2**63, 2**64 + 1,
                  10**9 + 1, 0, -5, 2.0, 2.5, True, False, "7", None, [7], {"n": 7}]


@pytest.mark.parametrize("value", HOSTILE_COUNTS, ids=repr)
def test_a_sample_count_that_is_not_a_bounded_integer_is_refused(value: Any) -> None:
    raw = _edit(encode(_update()), _set_meta(("num_samples",), value))
    with pytest.raises(CodecError, match=r"^update\.num_samples: "):
        decode(raw)


def test_the_sample_count_bound_holds_what_aggregation_needs() -> None:
    got = decode(encode(_update(num_samples=10**9)))
    assert isinstance(got, Update) and type(got.num_samples) is int
    # a thousand devices at the bound still sum exactly in float64
    assert float(1000 * got.num_samples) == 1000 * got.num_samples


@pytest.mark.parametrize(("msg", "field", "bad"), [
    (_update(), "weights", np.array([0, np.nan], np.float32)),
    (_update(), "weights", np.array([np.inf, 0], np.float32)),
    (RoundStart(RUN, 1, "server", weights=np.zeros(3, np.float32)), "weights",
     np.array([np.nan] * 3, np.float32)),
    (Smashed(RUN, 1, "dev-0", activations=np.zeros((2, 3), np.float32),
             labels=np.zeros(2, np.int64)), "activations", np.full((2, 3), np.nan, np.float32)),
    (Smashed(RUN, 1, "dev-0", activations=np.zeros((2, 3), np.float32),
             labels=np.zeros(2, np.int64)), "labels", np.array([1, -1], np.int64)),
    (Smashed(RUN, 1, "dev-0", activations=np.zeros((2, 3), np.float32),
             labels=np.zeros(2, np.int64)), "labels", np.array([1, 2**40], np.int64)),
    (Gradient(RUN, 1, "server", grad=np.zeros((2, 3), np.float32)), "grad",
     np.full((2, 3), np.inf, np.float32)),
], ids=["weights-nan", "weights-inf", "round-weights-nan", "activations-nan",
        "label-negative", "label-huge", "grad-inf"])
def test_arrays_with_values_out_of_bounds_are_refused(msg: Message, field: str,
                                                      bad: np.ndarray) -> None:
    with pytest.raises(CodecError, match=rf"^{msg.kind}\.{field}: "):
        decode(encode(dataclasses.replace(msg, **{field: bad})))


@pytest.mark.parametrize(("msg", "edit", "where"), [
    (Smashed(RUN, 1, "dev-0", activations=np.zeros((2, 3), np.float32),
             labels=np.zeros(3, np.int64)), None, "smashed.labels"),
    (Smashed(RUN, 1, "dev-0", activations=np.zeros((0, 3), np.float32),
             labels=np.zeros(0, np.int64)), None, "smashed.labels"),
    (Gradient(RUN, 1, "server", grad=np.zeros((0, 3), np.float32)), None, "grad.grad"),
    (_update(weights=np.zeros((2, 5), np.float32)), None, "update.weights"),
    (Gradient(RUN, 1, "server", grad=np.zeros((1, 3), np.float32)),
     _set_meta(("loss",), float("nan")), "grad.loss"),
    (Smashed(RUN, 1, "dev-0", activations=np.zeros((1, 3), np.float32),
             labels=np.zeros(1, np.int64)), _set_meta(("step",), -1), "smashed.step"),
], ids=["labels-not-batch", "empty-batch", "empty-grad", "weights-2d",
        "loss-nan", "step-negative"])
def test_shapes_and_scalars_that_do_not_fit_the_kind_are_refused(
        msg: Message, edit: Callable[[dict[str, Any]], None] | None, where: str) -> None:
    raw = encode(msg) if edit is None else _edit(encode(msg), edit)
    with pytest.raises(CodecError, match=rf"^{where.replace('.', chr(92) + '.')}"):
        decode(raw)


# -- 3. nested records: telemetry, join profile, server presence ------------------------------

def _bad_values(f: dataclasses.Field[Any]) -> list[Any]:
    """Values no field of this type may hold."""
    common = [[1], {"a": 1}, 10**30, float("nan"), float("inf"), "\x1b[2J"]
    return common if f.type == "bool | None" else [True, *common]


RECORDS = [(Telemetry, TELEMETRY, lambda v: _update(telemetry=v), ("telemetry",), "update"),
           (JoinProfile, PROFILE, lambda v: Join(RUN, -1, "dev-0", profile=v), ("profile",),
            "join"),
           (ServerInfo, {"model": "cnn", "cut": "conv2", "dataset": "digits", "train": TRAIN},
            lambda v: Presence(RUN, -1, "server", info=v), ("info",), "presence")]
RECORD_CASES = [(cls, good, make, path, kind, f) for cls, good, make, path, kind in RECORDS
                for f in dataclasses.fields(cls)]
RECORD_IDS = [f"{kind}.{path[0]}.{f.name}" for _, _, _, path, kind, f in RECORD_CASES]


@pytest.mark.parametrize(("cls", "good", "make", "path", "kind", "f"), RECORD_CASES,
                         ids=RECORD_IDS)
def test_a_record_field_missing_or_of_the_wrong_type_is_refused_naming_it(
        cls: type, good: dict[str, Any], make: Callable[[Any], Message], path: tuple[str, ...],
        kind: str, f: dataclasses.Field[Any]) -> None:
    raw = encode(make(good))
    got = decode(raw)
    record = getattr(got, path[0])
    assert isinstance(record, cls) and record.to_json() == {
        k: v for k, v in good.items() if v is not None}
    where = rf"^{kind}\.{path[0]}\.{f.name}(\[\d+\])?: "
    required = f.default is dataclasses.MISSING
    with (pytest.raises(CodecError, match=where + "missing") if required else _no_error()):
        decode(_edit(raw, _del_meta((*path, f.name))))
    for bad in _bad_values(f):
        if f.name == "train" and isinstance(bad, dict):
            continue  # any small config object is a config (its meaning: TrainConfig)
        with pytest.raises(CodecError, match=where):
            decode(_edit(raw, _set_meta((*path, f.name), bad)))


class _no_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(("cls", "good", "make", "path", "kind"), RECORDS,
                         ids=[r[4] for r in RECORDS])
def test_a_record_with_unknown_keys_or_not_an_object_is_refused(
        cls: type, good: dict[str, Any], make: Callable[[Any], Message], path: tuple[str, ...],
        kind: str) -> None:
    raw = encode(make(good))
    with pytest.raises(CodecError, match=rf"^{kind}\.{path[0]}: unknown fields \['surprise'\]"):
        decode(_edit(raw, _set_meta((*path, "surprise"), 1)))
    for bad in ("x", [1, 2], 5, True):
        with pytest.raises(CodecError, match=rf"^{kind}\.{path[0]}: "):
            decode(_edit(raw, _set_meta(path, bad)))
    with pytest.raises(CodecError, match=rf"^{kind}\.{path[0]}\."):
        make({**good, next(iter(good)): float("nan")})  # a sender cannot build one either


def test_empty_records_are_none_and_typed_access_cannot_fail() -> None:
    for msg, name in ((_update(telemetry={}), "telemetry"),
                      (Join(RUN, -1, "dev-0"), "profile"),
                      (Presence(RUN, -1, "dev-0", state="offline"), "info")):
        got = decode(encode(msg))
        assert getattr(got, name) is None
    tel = decode(encode(_update())).telemetry  # type: ignore[attr-defined]
    assert isinstance(tel, Telemetry)
    assert all(isinstance(getattr(tel, k), float) for k in ("peak_rss_mb", "loss_mean"))
    assert isinstance(tel.steps, int)


def test_the_devices_join_profile_decodes(tmp_path: Path) -> None:
    """The device's own profile and memory verdict, built by its code
    (`edge_runtime.device.join_profile`)."""
    from edge_runtime.device import join_profile
    from edge_runtime.profiles import MemoryVerdict

    verdict = MemoryVerdict(32, 900.0, "the rpi4 profile's budget", {1: 90.0, 32: 180.0},
                            True, 180.0, False, "rpi4")
    for v in (None, verdict):
        profile = join_profile(120, None, ("heron", "frozen"), None, v)
        got = decode(encode(Join("", -1, "dev-0", profile=profile, bundle_sha256="ab" * 32)))
        assert isinstance(got, Join) and got.profile == profile
    assert profile.profile == "rpi4" and profile.max_batch_measured_fit == 32
    assert profile.budget_mb == 900.0 and profile.memory_mb == 180.0
    nulled = _edit(encode(got), _set_meta(("profile", "threads"), None))
    assert decode(nulled).profile.threads is None  # type: ignore[attr-defined]


# -- every other field -------------------------------------------------------------------------

def _set_env(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        h[key] = value
    return edit


BAD_FIELDS: list[tuple[Message, Callable[[dict[str, Any]], None], str]] = [
    (_update(), _set_env("run_id", "a/b"), "update.run_id"),
    (_update(), _set_env("run_id", "r" * 65), "update.run_id"),
    (_update(), _set_env("round", -2), "update.round"),
    (_update(), _set_env("round", 3.0), "update.round"),
    (_update(), _set_env("round", True), "update.round"),
    (_update(), _set_env("round", 10**12), "update.round"),
    (_update(), _set_env("sender", "all"), "update.sender"),
    (_update(), _set_env("sender", "dev/0"), "update.sender"),
    (_update(), _set_env("sender", "+"), "update.sender"),
    (_update(), _set_env("sender", ""), "update.sender"),
    (_update(), _set_env("msg_id", "A" * 32), "update.msg_id"),
    (_update(), _set_env("msg_id", "0" * 33), "update.msg_id"),
    (_update(), _set_env("v", True), "unsupported header version"),
    (_update(), _set_env("extra", 1), "update header"),
    (DeviceError(RUN, 1, "dev-0", error="x"), _set_meta(("error",), "a\rb"), "error.error"),
    (DeviceError(RUN, 1, "dev-0", error="x"), _set_meta(("error",), "\ud800"), "error.error"),
    (DeviceError(RUN, 1, "dev-0", error="x"), _set_meta(("error",), "x" * 4097), "error.error"),
    (DeviceError(RUN, 1, "dev-0", error="x"), _set_meta(("error",), 5), "error.error"),
    (Stop(RUN, 1, "server", reason="x"), _set_meta(("reason",), "y" * 1025), "stop.reason"),
    (Presence(RUN, 1, "server"), _set_meta(("state",), "on"), "presence.state"),
    (Join(RUN, 1, "dev-0", profile=PROFILE), _set_meta(("bundle_sha256",), "AB" * 32),
     "join.bundle_sha256"),
    (Join(RUN, 1, "dev-0", profile=PROFILE), _set_meta(("profile", "algorithms"), []),
     "join.profile.algorithms"),
    (Join(RUN, 1, "dev-0", profile=PROFILE), _set_meta(("profile", "samples"), -1),
     "join.profile.samples"),
    (BundleFiles(RUN, 0, "server", names=("a",), blobs=(np.zeros(1, np.uint8),)),
     _set_meta(("names",), ["../a"]), "bundle.names"),
    (BundleFiles(RUN, 0, "server", names=("a",), blobs=(np.zeros(1, np.uint8),)),
     _set_meta(("names",), ["/etc/passwd"]), "bundle.names"),
    (BundleFiles(RUN, 0, "server", names=("a", "b"), blobs=(np.zeros(1, np.uint8),) * 2),
     _set_meta(("names",), ["a", "a"]), "bundle.names"),
    (RoundStart(RUN, 1, "server", participants=("dev-0",), config=TRAIN),
     _set_meta(("participants",), ["dev-0", "dev-0"]), "round.participants"),
    (RoundStart(RUN, 1, "server", participants=("dev-0",), config=TRAIN),
     _set_meta(("participants",), ["dev/0"]), "round.participants"),
    (RoundStart(RUN, 1, "server", participants=("dev-0",), config=TRAIN),
     _set_meta(("config", "zo", "mu"), float("nan")), "round.config.zo.mu"),
    (RoundStart(RUN, 1, "server", participants=("dev-0",), config=TRAIN),
     _set_meta(("config", "zo", "mu"), {"a": {"b": 1}}), "round.config.zo.mu"),
    (RoundStart(RUN, 1, "server", participants=("dev-0",), config=TRAIN),
     _set_meta(("config", "local_steps"), [40]), "round.config.local_steps"),
    (RoundStart(RUN, 1, "server", participants=("dev-0",), config=TRAIN),
     _set_meta(("config", "a-b"), 1), "round.config.a-b"),
    (RoundStart(RUN, 1, "server", participants=("dev-0",), config=TRAIN),
     _set_meta(("bundle_sha256",), "x"), "round.bundle_sha256"),
]


@pytest.mark.parametrize(("msg", "edit", "where"), BAD_FIELDS,
                         ids=[f"{w}-{i}" for i, (_, _, w) in enumerate(BAD_FIELDS)])
def test_every_field_out_of_bounds_is_refused_naming_it(
        msg: Message, edit: Callable[[dict[str, Any]], None], where: str) -> None:
    decode(encode(msg))  # the unedited message is fine
    with pytest.raises(CodecError, match="^" + where.replace(".", r"\.")):
        decode(_edit(encode(msg), edit))


def test_repeated_keys_in_a_header_are_refused() -> None:
    raw = encode(_update())
    (hlen,) = struct.unpack("<I", raw[4:8])
    head = raw[8:8 + hlen].replace(b'"num_samples":100', b'"num_samples":1,"num_samples":100')
    with pytest.raises(CodecError, match="repeated key"):
        decode(MAGIC + struct.pack("<I", len(head)) + head + raw[8 + hlen:])


def test_a_sender_cuts_its_error_text_to_what_the_receiver_takes() -> None:
    msg = DeviceError(RUN, 1, "dev-0", error="boom\x1b[2J\r" + "x" * 10_000)
    got = decode(encode(msg))
    assert isinstance(got, DeviceError) and got.error.startswith("boom?[2J?")
    assert len(got.error) == 4096


# -- the training config a device runs ----------------------------------------------------------

@pytest.mark.parametrize(("path", "value"), [
    (("local_steps",), 0), (("local_steps",), 10**7), (("local_steps",), 4.0),
    (("local_steps",), True), (("batch_size",), 2**21), (("batch_size",), "32"),
    (("upload_every",), -1), (("seed",), -1), (("seed",), 2**64), (("algorithm",), "evil"),
    (("zo",), "nope"), (("zo",), None), (("zo", "mu"), float("nan")), (("zo", "mu"), 0.0),
    (("zo", "mu"), float("inf")), (("zo", "q"), 0), (("zo", "q"), 10**6), (("zo", "q"), 1.5),
    (("zo", "scheme"), "backward"), (("zo", "nope"), 1), (("optimizer", "lr"), -1.0),
    (("optimizer", "lr"), float("nan")), (("optimizer", "lr"), 1e308),
    (("optimizer", "beta1"), 1.0), (("optimizer", "eps"), 0.0),
    (("optimizer", "weight_decay"), float("inf")), (("optimizer", "name"), "lbfgs"),
    (("nope",), 1),
])
def test_a_training_config_out_of_bounds_is_refused(path: tuple[str, ...], value: Any) -> None:
    obj = json.loads(json.dumps(TRAIN))
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises((ValueError, TypeError)):
        TrainConfig.from_json(obj)


def test_the_default_training_config_round_trips_through_a_round_start() -> None:
    cfg = TrainConfig(local_steps=300, batch_size=64, seed=7)
    got = decode(encode(RoundStart(RUN, 1, "server", config=cfg.to_json())))
    assert isinstance(got, RoundStart) and TrainConfig.from_json(got.config) == cfg


# -- property-based fuzz --------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

SEEDS: list[Message] = [
    Presence(RUN, -1, "server", info=ServerInfo(model="cnn", cut="conv2", dataset="digits",
                                                train=TRAIN)),
    Presence("", -1, "dev-0", state="offline"),
    Join("", -1, "dev-0", profile=PROFILE, bundle_sha256="ab" * 32),
    BundleFiles(RUN, 0, "server", names=("manifest.json", "train.onnx"),
                blobs=(np.frombuffer(b"{}", np.uint8), np.arange(50, dtype=np.uint8))),
    RoundStart(RUN, 2, "server", weights=np.ones(20, np.float32), participants=("a", "b"),
               config=TRAIN, bundle_sha256="cd" * 32),
    Smashed(RUN, 2, "dev-0", step=3, activations=np.ones((2, 3, 2), np.float32),
            labels=np.array([1, 0], np.int64)),
    Gradient(RUN, 2, "server", step=3, grad=np.ones((2, 3, 2), np.float32), loss=0.5),
    _update(weights=np.arange(4, dtype=np.float32)),
    DeviceError(RUN, 2, "dev-0", error="shard has label 11"),
    Stop(RUN, 2, "server", reason="finished"),
]
SEED_RAW = [encode(m) for m in SEEDS]

hostile_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                   | st.sampled_from([2**63, -(2**63) - 1, 10**9 + 1, 0, -1, 1])
                   | st.floats(allow_nan=True, allow_infinity=True)
                   | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0])
                   | st.text(max_size=12)
                   | st.sampled_from(["", "\x00", "\ud800", "a/b", "../x", "+", "#", "all",
                                      "x" * 300, "server", "A" * 32, "0" * 64]))
hostile_json = st.recursive(
    hostile_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.text(max_size=8) | st.sampled_from(list(TELEMETRY) + list(PROFILE)), kids,
        max_size=4),
    max_leaves=10)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a header's JSON where a value sits, nested ones included."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _header(raw: bytes) -> dict[str, Any]:
    (hlen,) = struct.unpack("<I", raw[4:8])
    return json.loads(raw[8:8 + hlen])


SEED_PATHS = [(i, p) for i, raw in enumerate(SEED_RAW) for p in _paths(_header(raw))]


def _accept_or_refuse(data: bytes) -> Message | None:
    """decode's only outcomes: a bounded message, or a CodecError raised by a named check."""
    try:
        msg = decode(data)
    except CodecError as exc:
        assert type(exc) is CodecError, exc  # not the catch-all for what no check named
        return None
    _assert_bounded(msg)
    return msg


def _assert_bounded(msg: Message) -> None:
    assert isinstance(msg, Message)
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, float):
            assert math.isfinite(v)
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            assert np.isfinite(v).all()
        if isinstance(v, (Telemetry, JoinProfile)):
            for x in v.to_json().values():
                assert not isinstance(x, float) or math.isfinite(x)
    assert encode(msg)  # and it can be sent on


@FUZZ
@given(st.sampled_from(SEED_PATHS), hostile_json)
def test_any_field_of_any_kind_set_to_hostile_json_decodes_bounded_or_is_refused(
        where: tuple[int, tuple[Any, ...]], value: Any) -> None:
    i, path = where

    def edit(h: dict[str, Any]) -> None:
        obj: Any = h
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    _accept_or_refuse(_edit(SEED_RAW[i], edit))


@FUZZ
@given(st.sampled_from(SEED_PATHS), st.booleans())
def test_any_field_of_any_kind_removed_decodes_bounded_or_is_refused(
        where: tuple[int, tuple[Any, ...]], add_instead: bool) -> None:
    i, path = where

    def edit(h: dict[str, Any]) -> None:
        obj: Any = h
        for key in path[:-1]:
            obj = obj[key]
        if isinstance(obj, dict) and not add_instead:
            del obj[path[-1]]
        elif isinstance(obj, dict):
            obj["x" + str(path[-1])] = 1
        else:
            obj.append(obj[path[-1]])

    _accept_or_refuse(_edit(SEED_RAW[i], edit))


@FUZZ
@given(st.sampled_from(range(len(SEED_RAW))),
       st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, 2**20)), st.binary(max_size=32))
def test_every_kind_flipped_truncated_or_extended_decodes_bounded_or_is_refused(
        i: int, flips: list[tuple[int, int]], cut: int | None, extra: bytes) -> None:
    data = bytearray(SEED_RAW[i])
    for pos, byte in flips:
        data[pos % len(data)] = byte
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    _accept_or_refuse(bytes(data))
    _accept_or_refuse(bytes(data) + extra)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_after_a_valid_prefix_decode_bounded_or_are_refused(tail: bytes) -> None:
    _accept_or_refuse(MAGIC + struct.pack("<I", len(tail)) + tail)
    _accept_or_refuse(MAGIC + tail)


forged_chunk = st.builds(
    lambda mid, index, count, total, body: CHUNK_HEAD.pack(b"HRC1", bytes([mid]) * 16, index,
                                                           count, total) + body,
    st.integers(0, 3), st.integers(0, 5) | st.integers(0, 2**32 - 1),
    st.integers(0, 5) | st.integers(0, 2**32 - 1),
    st.integers(0, 64) | st.integers(0, 2**64 - 1), st.binary(max_size=40))


@settings(FUZZ, max_examples=100)
@given(st.lists(st.tuples(st.sampled_from([topics.up("evil", "update"),
                                           topics.up("evil", "join"),
                                           topics.device_status("evil"), "evil/other"]),
                          forged_chunk | st.binary(max_size=40), st.floats(0, 50)),
                max_size=30),
       st.randoms(use_true_random=False))
def test_chunk_streams_from_an_attacker_never_block_or_corrupt_an_honest_message(
        attack: list[tuple[str, bytes, float]], rnd: Any) -> None:
    """Honest chunks interleaved with an attacker's (other topics, any header, any bytes):
    nothing but CodecError escapes, and each honest message comes out once, intact."""
    honest = {topics.up(f"dev-{i}", "update"): _update(f"dev-{i}", d=300 + i) for i in range(2)}
    raws = {t: encode(m) for t, m in honest.items()}
    stream = [(t, p, None) for t, m in honest.items()
              for p in chunk(raws[t], m.msg_id, 256)]
    stream += [(t, p, step) for t, p, step in attack]
    rnd.shuffle(stream)
    re = Reassembler(timeout_s=1e9)
    now, done = 0.0, {}
    for topic, payload, step in stream:
        now += step or 0.0
        try:
            out = re.add(topic, payload, now=now, kind=topics.payload_kind(topic))
        except CodecError as exc:
            assert type(exc) is CodecError
            assert topic not in raws, exc  # only the attacker's chunks are refused
            continue
        if out is not None:
            assert isinstance(out, memoryview)
            if topic in raws:
                assert topic not in done and out == raws[topic]
                done[topic] = True
            else:
                _accept_or_refuse(bytes(out))
    assert set(done) == set(raws)
