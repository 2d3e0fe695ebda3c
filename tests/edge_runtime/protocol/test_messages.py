"""Wire codec: every kind round-trips, chunks stay under the MQTT limit, the reassembler
survives QoS 1 redelivery and reordering, and bad bytes only ever raise CodecError.

Bounds of each field and the attacks they stop: tests/edge_runtime/test_hostile_input.py."""

from __future__ import annotations

import dataclasses
import json
import random
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.protocol import (
    DTYPES,
    MAGIC,
    MAX_CHUNK_PAYLOAD,
    MAX_MESSAGE_BYTES,
    BundleFiles,
    CodecError,
    DeviceError,
    Gradient,
    Join,
    Message,
    Presence,
    Reassembler,
    RoundStart,
    ServerInfo,
    Smashed,
    Stop,
    Telemetry,
    Update,
    WeightsReply,
    WeightsRequest,
    chunk,
    decode,
    encode,
    new_msg_id,
)

# The chunk header as documented in messages.py: magic, 16-byte message id, index, count,
# total bytes. Written out here so that a silent change of the wire format fails a test.
CHUNK_HEAD = struct.Struct("<4s16sIIQ")
ENV: dict[str, Any] = {"run_id": "run-7", "round": 3, "sender": "dev-0"}
# What a device sends (edge_runtime/device/records.py `round_telemetry`, `join_profile`).
TELEMETRY: dict[str, Any] = {
    "peak_rss_mb": 80.0, "step_ms_median": 1.5, "step_ms_mean": 2.0, "round_s": 3.25,
    "loss_first": 2.3, "loss_last": 1.25, "loss_mean": 1.5, "steps": 40, "smashed_sent": 20,
    "threads": 2, "algorithm": "heron", "bytes_in": 123_456, "bytes_out": 7_890}
PROFILE: dict[str, Any] = {
    "samples": 120, "python": "3.11.7", "machine": "aarch64", "onnxruntime": "1.20.1",
    "numpy": "2.1.0", "threads": 4, "rss_mb": 41.5, "algorithms": ["heron", "frozen"],
    "profile": "rpi4", "budget_mb": 3000.0, "memory_mb": 181.2, "memory_batch": 32,
    "memory_extrapolated": False, "max_batch_measured_fit": 32}


def _rng_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "bool":
        flat = rng.integers(0, 2, n).astype(bool)
    elif np.dtype(dtype).kind == "f":
        flat = rng.standard_normal(n).astype(dtype)
    else:
        info = np.iinfo(np.dtype(dtype))
        flat = rng.integers(info.min, info.max, n, dtype=np.dtype(dtype), endpoint=True)
    return flat.reshape(shape)


def _messages() -> list[Message]:
    """One (or more) message of every kind, with arrays of several dtypes and shapes."""
    return [
        Presence(**ENV, state="online", info=ServerInfo(
            model="cnn", cut="conv2", dataset="digits",
            train={"batch_size": 32, "zo": {"mu": 0.001, "scheme": "forward"}, "x": None})),
        Presence(**ENV, state="offline"),
        Join(**ENV, profile=PROFILE, bundle_sha256=None),
        Join(**ENV, profile={"samples": 0, "algorithms": ["cse-fsl"]}, bundle_sha256="ab" * 32),
        Join(**ENV),
        BundleFiles(**ENV, names=("manifest.json", "train.onnx", "weights.bin"),
                    blobs=(np.frombuffer(b'{"a": 1}', np.uint8), _rng_array("uint8", (1000,)),
                           np.zeros(0, np.uint8))),
        BundleFiles(**ENV),
        RoundStart(**ENV, weights=_rng_array("float32", (333,)),
                   participants=("dev-0", "dev-1"),
                   config={"local_steps": 5, "zo": {"mu": 0.001}}, bundle_sha256="cd" * 32),
        RoundStart(**ENV),
        Smashed(**ENV, step=4, activations=_rng_array("float32", (5, 16, 4, 4)),
                labels=np.array([3, 0, 9, 1, 2], np.int64)),
        Smashed(**ENV, step=0, activations=np.zeros((1, 0), np.float32),
                labels=np.zeros(1, np.int64)),
        Gradient(**ENV, step=7, grad=_rng_array("float32", (5, 16, 4, 4)), loss=2.25),
        Update(**ENV, weights=_rng_array("float32", (257,)), num_samples=120,
               telemetry=TELEMETRY),
        Update(**ENV, weights=_rng_array("float32", (0,)), num_samples=10**9,
               telemetry=Telemetry(**{**TELEMETRY, "threads": None, "algorithm": None})),
        Update(**ENV),
        WeightsRequest(**ENV, reason="replay mismatch"),
        WeightsReply(**ENV, weights=_rng_array("float32", (257,))),
        DeviceError(**ENV, error="shard has label 11 but the bundle has 10 classes"),
        Stop(**ENV, reason="done"),
        Stop(run_id="", round=-1, sender="server", reason="ünïcode ✓"),
    ]


MESSAGES = _messages()
IDS = [f"{m.kind}-{i}" for i, m in enumerate(MESSAGES)]


def assert_same_message(got: Message, want: Message) -> None:
    """Field-by-field equality; arrays must match in values, dtype, shape and be native."""
    assert type(got) is type(want)
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, tuple) and b and isinstance(b[0], np.ndarray):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                _assert_same_array(x, y)
        elif isinstance(b, np.ndarray):
            _assert_same_array(a, b)
        else:
            assert a == b, f.name


def _assert_same_array(got: np.ndarray, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.shape == want.shape
    assert got.dtype == want.dtype.newbyteorder("=")
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, want)


def _header(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (hlen,) = struct.unpack("<I", raw[4:8])
    return json.loads(raw[8:8 + hlen]), raw[8 + hlen:]


def _rebuild(raw: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Re-encode `raw` after editing its header JSON (to forge malformed messages)."""
    header, body = _header(raw)
    edit(header)
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + body


def _small() -> bytes:
    return encode(Smashed(**ENV, step=1, activations=np.arange(6, dtype=np.float32)
                          .reshape(2, 3), labels=np.array([1, 0], np.int64)))


# --- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("msg", MESSAGES, ids=IDS)
def test_every_kind_round_trips(msg: Message) -> None:
    raw = encode(msg)
    assert raw.startswith(MAGIC)
    assert_same_message(decode(raw), msg)
    assert encode(decode(raw)) == raw  # encoding is a function of the message alone


ARRAY_KINDS = [  # (kind, array, the dtype it must have)
    (Update, "weights", "float32"), (RoundStart, "weights", "float32"),
    (Smashed, "activations", "float32"), (Smashed, "labels", "int64"),
    (Gradient, "grad", "float32"), (BundleFiles, "file0", "uint8"),
    (WeightsReply, "weights", "float32")]


def _with_array(cls: type[Message], name: str, arr: np.ndarray) -> Message:
    """A message of `cls` whose array `name` is `arr` (its partners sized to match)."""
    if cls is BundleFiles:
        return BundleFiles(**ENV, names=("f",), blobs=(arr,))
    if cls is Smashed:
        n = arr.shape[0] if arr.ndim else 1
        acts = arr if name == "activations" else np.zeros((n, 2), np.float32)
        return Smashed(**ENV, activations=acts, labels=arr if name == "labels"
                       else np.zeros(n, np.int64))
    return cls(**ENV, **{name: arr})  # type: ignore[arg-type]


@pytest.mark.parametrize(("cls", "name", "dtype"), ARRAY_KINDS,
                         ids=[f"{c.kind}.{n}" for c, n, _ in ARRAY_KINDS])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_every_array_of_every_kind_round_trips(cls: type[Message], name: str, dtype: str,
                                               n: int) -> None:
    if n == 0 and cls in (Smashed, Gradient):
        return  # a batch of at least one (test_hostile_input)
    arr = _rng_array(dtype, (n,), seed=n)
    if name == "labels":
        arr = arr % 10  # class indices
    msg = _with_array(cls, name, arr)
    assert_same_message(decode(encode(msg)), msg)


@pytest.mark.parametrize("shape", [(1,), (3, 0, 2), (2, 3, 4), (1,) * 8],
                         ids=lambda s: "x".join(map(str, s)))
def test_batched_arrays_of_any_rank_round_trip(shape: tuple[int, ...]) -> None:
    acts = _rng_array("float32", shape)
    for msg in (_with_array(Smashed, "activations", acts),
                Gradient(**ENV, step=1, grad=acts, loss=0.5)):
        assert_same_message(decode(encode(msg)), msg)


@pytest.mark.parametrize(("cls", "name", "dtype"), ARRAY_KINDS,
                         ids=[f"{c.kind}.{n}" for c, n, _ in ARRAY_KINDS])
def test_an_array_of_another_dtype_is_refused_naming_it(cls: type[Message], name: str,
                                                        dtype: str) -> None:
    spec = cls._arrays.get(name)
    coded = spec.also if spec else ()  # a smashed codec's dtypes: refused by the codec field
    for other in DTYPES:
        if other != dtype:
            raw = encode(_with_array(cls, name, _rng_array(other, (3,))))
            where = "smashed.codec: codec fp32" if other in coded else \
                rf"{cls.kind}\.{name}: dtype '{other}'"
            with pytest.raises(CodecError, match=where):
                decode(raw)


def test_non_contiguous_arrays_round_trip() -> None:
    base = _rng_array("float32", (6, 8))
    msg = Smashed(**ENV, activations=base.T, labels=np.arange(24, dtype=np.int64)[::3])
    assert not msg.activations.flags.c_contiguous
    assert_same_message(decode(encode(msg)), msg)


@pytest.mark.parametrize(("cls", "dtype", "name"), [(Update, "float32", "weights"),
                                                    (Smashed, "int64", "labels"),
                                                    (Smashed, "float32", "activations")])
def test_big_endian_arrays_come_back_equal_in_native_order(cls: type[Message], dtype: str,
                                                           name: str) -> None:
    little = _rng_array(dtype, (12,))
    if name == "labels":
        little = np.abs(little) % 10
    big = little.astype(np.dtype(DTYPES[dtype]).newbyteorder(">"))
    msg = _with_array(cls, name, big)
    got = decode(encode(msg))
    assert isinstance(got, cls)
    assert getattr(got, name).dtype.isnative
    np.testing.assert_array_equal(getattr(got, name), little)
    assert encode(msg) == encode(dataclasses.replace(_with_array(cls, name, little),
                                                     msg_id=msg.msg_id))


def test_single_byte_dtypes_have_no_byte_order_problem() -> None:
    arr = np.dtype("|u1").newbyteorder(">")
    msg = BundleFiles(**ENV, names=("a",), blobs=(np.arange(5, dtype=arr),))
    assert_same_message(decode(encode(msg)), msg)


def test_unsupported_dtype_cannot_be_encoded() -> None:
    with pytest.raises(CodecError, match="complex64"):
        encode(RoundStart(**ENV, weights=np.zeros(3, np.complex64)))


def test_message_ids_are_unique_and_chunkable() -> None:
    ids = {new_msg_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(chunk(b"x", i)) == 1 for i in ids)


# --- chunking ------------------------------------------------------------------------------

def _overhead() -> int:
    return len(chunk(b"", new_msg_id())[0])


def test_chunk_header_size_matches_the_documented_layout() -> None:
    assert _overhead() == CHUNK_HEAD.size


def test_three_megabyte_message_is_chunked_under_the_limit_and_reassembled_shuffled() -> None:
    msg = RoundStart(**ENV, weights=_rng_array("float32", (750_000,)))
    raw = encode(msg)
    assert len(raw) > 3_000_000
    parts = chunk(raw, msg.msg_id)
    assert all(len(p) <= MAX_CHUNK_PAYLOAD for p in parts)
    assert len(parts) == -(-len(raw) // (MAX_CHUNK_PAYLOAD - CHUNK_HEAD.size)) == 4
    assert b"".join(p[CHUNK_HEAD.size:] for p in parts) == raw
    random.Random(0).shuffle(parts)
    re = Reassembler()
    outs = [re.add("heron/down/all/round", p, now=0.0) for p in parts]
    assert outs[:-1] == [None] * (len(parts) - 1)
    assert outs[-1] == raw
    assert_same_message(decode(outs[-1]), msg)


def _message_of_size(size: int) -> tuple[Message, bytes]:
    """A BundleFiles message whose encoding is exactly `size` bytes long."""
    n = size - len(encode(BundleFiles(**ENV, names=("f",), blobs=(np.zeros(size, np.uint8),)))
                   ) + size
    msg = BundleFiles(**ENV, names=("f",), blobs=(np.zeros(n, np.uint8),))
    raw = encode(msg)
    assert len(raw) == size
    return msg, raw


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_message_at_the_chunk_boundary(extra: int) -> None:
    per = MAX_CHUNK_PAYLOAD - CHUNK_HEAD.size
    msg, raw = _message_of_size(per + extra)
    parts = chunk(raw, msg.msg_id)
    assert [len(p) for p in parts] == ([MAX_CHUNK_PAYLOAD - (extra < 0)] if extra <= 0
                                       else [MAX_CHUNK_PAYLOAD, CHUNK_HEAD.size + 1])
    re = Reassembler()
    assert [re.add("t", p) for p in parts][-1] == raw


@pytest.mark.parametrize("max_payload", [CHUNK_HEAD.size + 1, 100, 4096])
def test_small_chunk_limit_is_respected(max_payload: int) -> None:
    raw = bytes(range(256)) * 37
    parts = chunk(raw, new_msg_id(), max_payload)
    assert all(len(p) <= max_payload for p in parts)
    re = Reassembler()
    assert [re.add("t", p) for p in reversed(parts)][-1] == raw


def test_chunk_limit_below_header_size_is_refused() -> None:
    with pytest.raises(ValueError):
        chunk(b"abc", new_msg_id(), CHUNK_HEAD.size)


def test_empty_payload_is_one_chunk() -> None:
    parts = chunk(b"", new_msg_id())
    assert len(parts) == 1
    assert Reassembler().add("t", parts[0]) == b""


# --- reassembly ----------------------------------------------------------------------------

def _parts(n_chunks: int = 3, per: int = 10) -> tuple[bytes, list[bytes]]:
    raw = bytes(i % 251 for i in range(per * n_chunks - 3))
    parts = chunk(raw, new_msg_id(), CHUNK_HEAD.size + per)
    assert len(parts) == n_chunks
    return raw, parts


def test_duplicate_chunks_are_ignored_and_counted() -> None:
    raw, (a, b, c) = _parts()
    re = Reassembler()
    assert re.add("t", b) is None
    assert re.add("t", b) is None
    assert re.duplicates == 1
    assert re.add("t", a) is None
    assert re.add("t", c) == raw
    assert re.duplicates == 1


def test_redelivered_whole_message_is_applied_once() -> None:
    raw, parts = _parts()
    re = Reassembler()
    assert [re.add("t", p) for p in parts][-1] == raw
    assert [re.add("t", p) for p in parts] == [None, None, None]
    assert re.duplicates == 3


def test_same_message_id_on_another_topic_is_a_separate_message() -> None:
    raw, (a, b, c) = _parts()
    re = Reassembler()
    assert re.add("heron/up/dev-0/update", a) is None
    assert re.add("heron/up/dev-1/update", b) is None  # cannot complete dev-0's message
    assert re.add("heron/up/dev-1/update", c) is None
    assert re.add("heron/up/dev-0/update", b) is None
    assert re.add("heron/up/dev-0/update", c) == raw
    assert re.add("heron/up/dev-1/update", a) == raw
    assert re.duplicates == 0


def test_incomplete_messages_expire_after_the_timeout() -> None:
    raw, (a, b, c) = _parts()
    re = Reassembler(timeout_s=10.0)
    assert re.add("t", a, now=100.0) is None
    assert re.add("t", b, now=105.0) is None
    assert re.add("t", c, now=111.0) is None  # a and b were dropped at 110+
    assert re.add("t", a, now=112.0) is None
    assert re.add("t", b, now=113.0) == raw


def test_expired_messages_are_counted() -> None:
    _, (a, b, _c) = _parts()
    re = Reassembler(timeout_s=10.0)
    assert re.add("t", a, now=0.0) is None
    assert re.add("u", b, now=5.0) is None
    assert re.expired == 0
    assert re.add("v", a, now=12.0) is None  # drops the one from "t"
    assert re.expired == 1
    assert re.add("v", b, now=100.0) is None  # drops "u" and "v"
    assert re.expired == 3


def test_message_within_the_timeout_completes() -> None:
    raw, (a, b, c) = _parts()
    re = Reassembler(timeout_s=10.0)
    assert re.add("t", a, now=100.0) is None
    assert re.add("t", b, now=105.0) is None
    assert re.add("t", c, now=109.5) == raw


def test_pending_byte_budget_counts_received_bytes_and_evicts_the_largest_holder() -> None:
    _, parts = _parts(n_chunks=3, per=100)
    _, other = _parts(n_chunks=3, per=100)
    re = Reassembler(max_pending_bytes=3 * 4096 + 600)
    assert re.add("a", parts[0]) is None
    assert re.add("a", other[0]) is None  # "a" now holds two messages
    assert re.pending_bytes() == 2 * (4096 + 100 + 64)  # received, not the 297 declared
    assert re.add("b", parts[0]) is None
    assert re.add("b", parts[1]) is None  # over budget: "a", the largest holder, loses one
    assert re.evicted == 1 and re.pending_messages("a") == 1 and re.pending_messages("b") == 1
    assert re.add("b", parts[2]) is not None  # b completes


def test_a_topic_over_its_message_budget_drops_its_own_oldest() -> None:
    re = Reassembler(max_topic_messages=2)
    firsts = [_parts()[1][0] for _ in range(3)]
    for p in firsts:
        assert re.add("a", p) is None
    assert re.pending_messages("a") == 2 and re.evicted == 1


def _forged(magic: bytes = b"HRC1", index: int = 0, count: int = 1, total: int = 3,
            body: bytes = b"abc", mid: bytes = b"\x01" * 16) -> bytes:
    return CHUNK_HEAD.pack(magic, mid, index, count, total) + body


def test_forged_chunk_is_accepted_when_consistent() -> None:
    assert Reassembler().add("t", _forged()) == b"abc"


@pytest.mark.parametrize("payload", [
    _forged(magic=b"HRN1"),
    _forged(magic=b"\x00\x00\x00\x00"),
    _forged()[:CHUNK_HEAD.size - 1],
    b"",
    b"HRC1",
    _forged(count=0),
    _forged(index=1, count=1),
    _forged(index=7, count=3),
    _forged(total=MAX_MESSAGE_BYTES + 1),
    _forged(total=5),  # says 5 bytes, delivers 3
    _forged(total=1),
    _forged(total=MAX_CHUNK_PAYLOAD - CHUNK_HEAD.size + 1,
            body=bytes(MAX_CHUNK_PAYLOAD - CHUNK_HEAD.size + 1)),  # consistent, 1 byte too big
], ids=["chunk-magic-of-a-message", "zero-magic", "one-short", "empty", "magic-only",
        "count-0", "index-eq-count", "index-gt-count", "oversized-total", "total-too-big",
        "total-too-small",
        "oversized-chunk"])
def test_bad_chunks_raise_codec_error(payload: bytes) -> None:
    with pytest.raises(CodecError):
        Reassembler().add("t", payload)


def test_chunk_disagreeing_with_earlier_chunks_is_rejected() -> None:
    re = Reassembler()
    assert re.add("t", _forged(index=0, count=2, total=6)) is None
    with pytest.raises(CodecError, match="disagrees"):
        re.add("t", _forged(index=1, count=3, total=6))
    with pytest.raises(CodecError, match="disagrees"):
        re.add("t", _forged(index=1, count=2, total=7))
    assert re.add("t", _forged(index=1, count=2, total=6)) == b"abcabc"


# --- decode rejects bad bytes with CodecError --------------------------------------------

def test_every_truncation_raises_codec_error() -> None:
    raw = _small()
    for n in range(len(raw)):
        with pytest.raises(CodecError):
            decode(raw[:n])
    assert isinstance(decode(raw), Smashed)


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(CodecError, match="trailing"):
        decode(_small() + b"\x00")


def test_bad_magic_is_rejected() -> None:
    raw = _small()
    for bad in (b"HRC1", b"hrn1", b"\x00\x00\x00\x00"):
        with pytest.raises(CodecError, match="magic"):
            decode(bad + raw[4:])


@pytest.mark.parametrize("hlen", [0, 1, 2**31, 2**32 - 1])
def test_bad_header_length_is_rejected(hlen: int) -> None:
    raw = _small()
    with pytest.raises(CodecError):
        decode(raw[:4] + struct.pack("<I", hlen) + raw[8:])


def test_header_length_off_by_one_is_rejected() -> None:
    raw = _small()
    (hlen,) = struct.unpack("<I", raw[4:8])
    for delta in (-1, 1):
        with pytest.raises(CodecError):
            decode(raw[:4] + struct.pack("<I", hlen + delta) + raw[8:])


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        h[key] = value
    return edit


def _set_array(key: str, value: Any, i: int = 0) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        h["arrays"][i][key] = value
    return edit


def _del(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        del h[key]
    return edit


BAD_HEADERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown-kind": _set("kind", "telepathy"),
    "kind-null": _set("kind", None),
    "version-2": _set("v", 2),
    "no-version": _del("v"),
    "no-run-id": _del("run_id"),
    "round-not-int": _set("round", "three"),
    "meta-list": _set("meta", [1, 2]),
    "arrays-null": _set("arrays", None),
    "arrays-missing-one": _set("arrays", []),
    "unknown-dtype": _set_array("dtype", "float16"),
    "dtype-numpy-code": _set_array("dtype", "<f4"),
    "dtype-object": _set_array("dtype", "object"),
    "negative-shape": _set_array("shape", [-2, -3]),
    "negative-one-dim": _set_array("shape", [-1]),
    "shape-too-big": _set_array("shape", [2, 4]),
    "shape-too-small": _set_array("shape", [2, 2]),
    "shape-huge": _set_array("shape", [2**62, 2**62]),
    "shape-float": _set_array("shape", [1e300]),
    "shape-string": _set_array("shape", ["x"]),
    "shape-nine-dims": _set_array("shape", [1] * 9),
    "renamed-array": _set_array("name", "weights"),
    "unknown-meta-field": lambda h: h["meta"].update(bogus=1),
    "meta-overrides-array": lambda h: h["meta"].update(labels=[1, 0]),
    "meta-overrides-kind": lambda h: h["meta"].update(kind="update"),
}


@pytest.mark.parametrize("edit", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
def test_malformed_header_raises_codec_error(edit: Callable[[dict[str, Any]], None]) -> None:
    with pytest.raises(CodecError):
        decode(_rebuild(_small(), edit))


@pytest.mark.parametrize("head", [b"not json", b"[1, 2]", b'"x"', b"\xff\xfe", b"{}", b"null"])
def test_header_that_is_not_a_json_object_raises_codec_error(head: bytes) -> None:
    with pytest.raises(CodecError):
        decode(MAGIC + struct.pack("<I", len(head)) + head)


UNKNOWN_META = [pytest.param(m, id=i) for m, i in zip(MESSAGES, IDS, strict=True)]


@pytest.mark.parametrize("msg", UNKNOWN_META)
def test_unknown_meta_field_is_rejected_for_every_kind(msg: Message) -> None:
    raw = _rebuild(encode(msg), lambda h: h["meta"].update(surprise=True))
    with pytest.raises(CodecError):
        decode(raw)


def test_bundle_with_fewer_arrays_than_names_is_rejected() -> None:
    raw = encode(BundleFiles(**ENV, names=("a", "b"),
                             blobs=(np.zeros(2, np.uint8), np.ones(3, np.uint8))))
    with pytest.raises(CodecError):
        decode(_rebuild(raw, lambda h: h["meta"].update(names=["a", "b", "c"])))
    with pytest.raises(CodecError):
        decode(_rebuild(raw, lambda h: h["meta"].update(names=["a"])))


def test_decode_refuses_oversized_input_without_reading_it() -> None:
    huge = np.broadcast_to(np.zeros(1, np.uint8), (MAX_MESSAGE_BYTES + 1,))  # no 512 MB copy
    with pytest.raises(CodecError, match="exceeds"):
        decode(memoryview(huge))  # type: ignore[arg-type]


# --- fuzzing ------------------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SEED_MESSAGES = [encode(m) for m in MESSAGES if len(encode(m)) < 20_000]


def _decode_or_codec_error(data: bytes) -> None:
    """decode returns a Message or refuses with a CodecError that one of its checks raised
    on purpose (its catch-all for what no check named would be a bug, and fails here)."""
    try:
        out = decode(data)
    except CodecError as exc:
        assert type(exc) is CodecError, exc
        return
    assert isinstance(out, Message)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_raise_codec_error(data: bytes) -> None:
    _decode_or_codec_error(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                              max_size=4),
    max_leaves=12)


@FUZZ
@given(st.sampled_from(SEED_MESSAGES), st.sampled_from(["v", "kind", "run_id", "round", "msg_id",
                                                        "sender", "meta", "arrays"]),
       json_values, st.binary(max_size=64))
def test_random_header_values_decode_or_raise_codec_error(
        raw: bytes, key: str, value: Any, tail: bytes) -> None:
    _decode_or_codec_error(_rebuild(raw, _set(key, value)))
    _decode_or_codec_error(_rebuild(raw, _set(key, value)) + tail)


@FUZZ
@given(st.sampled_from(SEED_MESSAGES), st.lists(st.tuples(st.integers(0, 2**31),
                                                          st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.integers(0, 2**31)), st.binary(max_size=16))
def test_mutated_messages_decode_or_raise_codec_error(
        raw: bytes, flips: list[tuple[int, int]], cut: int | None, extra: bytes) -> None:
    data = bytearray(raw)
    for pos, byte in flips:
        data[pos % len(data)] = byte
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    _decode_or_codec_error(bytes(data))
    _decode_or_codec_error(bytes(data) + extra)


@FUZZ
@given(st.lists(st.binary(max_size=96), min_size=1, max_size=6))
def test_random_bytes_into_reassembler_raise_codec_error_or_return(payloads: list[bytes]) -> None:
    re = Reassembler()
    for p in payloads:
        for data in (p, b"HRC1" + p):
            try:
                out = re.add("t", data, now=0.0)
            except CodecError:
                continue
            assert out is None or isinstance(out, memoryview)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=6),
       st.permutations(range(4)))
def test_mutated_chunks_into_reassembler_raise_codec_error_or_return(
        flips: list[tuple[int, int]], order: list[int]) -> None:
    raw = SEED_MESSAGES[0]
    parts = chunk(raw, new_msg_id(), CHUNK_HEAD.size + -(-len(raw) // 4))
    assert len(parts) == 4
    re = Reassembler()
    for i in order:
        data = bytearray(parts[i])
        if i == order[0]:
            for pos, byte in flips:
                data[pos % len(data)] = byte
        try:
            out = re.add("t", bytes(data), now=0.0)
        except CodecError:
            continue
        assert out is None or isinstance(out, memoryview)
        if out is not None:
            _decode_or_codec_error(out)


def test_a_reassembled_bundle_is_decoded_without_copying_its_files() -> None:
    """A large chunked bundle is rebuilt into one private buffer and its files stay views
    into it: a device holds one copy of a 76 MB bundle, not three (pieces, join, arrays)."""
    blob = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8)
    msg = BundleFiles("run-1", -1, "server", names=("manifest.json", "train.onnx.data"),
                      blobs=(np.frombuffer(b"{}", np.uint8), blob))
    re = Reassembler()
    out = None
    for part in chunk(encode(msg), msg.msg_id):
        out = re.add("t", part, now=0.0) or out
    assert isinstance(out, memoryview)
    got = decode(out)
    assert isinstance(got, BundleFiles)
    assert np.shares_memory(got.blobs[1], np.frombuffer(out, np.uint8))
    views = got.views()
    assert views["train.onnx.data"] == blob.tobytes() and bytes(views["manifest.json"]) == b"{}"
    got.release()  # what a device does once it has stored the files
    assert got.blobs == () and got.names == ()
    # a payload that is still the MQTT client's read-only bytes is copied, never aliased
    single = encode(msg)
    assert not np.shares_memory(decode(single).blobs[1], np.frombuffer(single, np.uint8))
