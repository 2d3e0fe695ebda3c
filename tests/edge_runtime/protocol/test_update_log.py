"""The replay form of `Update` at the codec: typed, bounded, one form or the other."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_runtime.protocol import Update, codec, decode, encode
from edge_runtime.protocol.fields import CodecError

ENV = {"run_id": "r", "round": 1, "sender": "dev-0"}
HASH = "0123456789abcdef" * 2


def _log(n: int = 4) -> Update:
    return Update(**ENV, seeds=np.arange(n, dtype=np.uint64),
                  projected=np.linspace(-1, 1, n, dtype=np.float32), weights_hash=HASH)


def test_a_log_round_trips() -> None:
    msg = decode(encode(_log()))
    assert isinstance(msg, Update) and msg.weights.size == 0 and msg.weights_hash == HASH
    assert msg.seeds.dtype == np.uint64 and msg.projected.dtype == np.float32
    np.testing.assert_array_equal(msg.seeds, np.arange(4, dtype=np.uint64))


@pytest.mark.parametrize(("change", "error"), [
    ({"projected": np.asarray([1, np.nan, 0, 0], np.float32)}, "update.projected: contains NaN"),
    ({"projected": np.asarray([1, np.inf, 0, 0], np.float32)}, "update.projected: contains NaN"),
    ({"projected": np.zeros(3, np.float32)}, "expected one per seed"),
    ({"projected": np.zeros((2, 2), np.float32)}, "update.projected: shape"),
    ({"seeds": np.arange(4, dtype=np.int64)}, "update.seeds: dtype 'int64', expected uint64"),
    ({"projected": np.zeros(4, np.float64)}, "update.projected: dtype 'float64'"),
    ({"weights_hash": None}, "update.weights_hash: missing"),
    ({"weights_hash": "ABC"}, "update.weights_hash: 'ABC' is not 32 lowercase hex"),
    ({"weights_hash": HASH + "00"}, "is not 32 lowercase hex"),
    ({"weights": np.ones(3, np.float32)}, "carries both weights and a replay log"),
])
def test_a_bad_log_is_refused_with_its_field_named(change: dict[str, object],
                                                   error: str) -> None:
    with pytest.raises(CodecError, match=None) as exc:
        decode(encode(dataclasses.replace(_log(), **change)))
    assert error in str(exc.value)


def test_a_hash_without_a_log_is_weights_with_a_stray_hash() -> None:
    msg = Update(**ENV, weights=np.ones(3, np.float32), weights_hash=HASH)
    with pytest.raises(CodecError, match="carries both"):
        decode(encode(msg))


def test_the_log_length_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_LOG", 3)
    with pytest.raises(CodecError, match="at most 3"):
        decode(encode(_log(4)))
    decode(encode(_log(3)))
