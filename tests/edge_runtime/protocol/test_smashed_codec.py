"""Round trips of every smashed codec, with the error bound each one promises, and the
boundary that refuses a codec header that does not fit its data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from edge_runtime.protocol import CodecError, Smashed, decode, encode
from edge_runtime.protocol.smashed_codec import (
    CODECS,
    FP16_MAX,
    SmashedCodecError,
    channel_axis,
    param_shape,
)
from edge_runtime.protocol.smashed_codec import decode as decode_smashed
from edge_runtime.protocol.smashed_codec import encode as encode_smashed

U = 2.0 ** -24  # float32 unit roundoff (round to nearest)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "random_nchw": rng.normal(size=(4, 6, 5, 5)).astype(np.float32),
        "random_text": rng.normal(3.0, 0.01, size=(2, 7, 9)).astype(np.float32),
        "random_2d": rng.uniform(-2, 5, size=(3, 11)).astype(np.float32),
        "relu_like": np.maximum(rng.normal(size=(2, 4, 3, 3)), 0).astype(np.float32),
        "constant": np.full((3, 4, 2, 2), 1.75, np.float32),
        "zero": np.zeros((2, 3, 4), np.float32),
        "extreme_fp16_range": (rng.uniform(-1, 1, size=(2, 5, 3, 3)) *
                               np.logspace(-12, 4.8, 5)[None, :, None, None]).astype(np.float32),
        "extreme_int8_range": (rng.uniform(-1, 1, size=(2, 5, 3)) *
                               np.logspace(-30, 30, 3)[None, None, :]).astype(np.float32),
        # channel ranges whose scale (range / 255) is below float32's smallest normal value:
        # subnormal inputs, and tiny steps on a large offset
        "tiny_range": (np.array([0.0, 5.0, -1e-30, 0.0], np.float32)[None, :, None, None] +
                       rng.uniform(0, 1, size=(3, 4, 2, 2)).astype(np.float32) *
                       np.array([1e-40, 1e-6, 1e-38, 1e-45], np.float32)[None, :, None, None]
                       ).astype(np.float32),
    }


def _roundtrip(x: np.ndarray, codec: str) -> np.ndarray:
    """Through the wire: encoded, framed, decoded, dequantized."""
    msg = Smashed.coded("run", 1, "dev-1", 0, x, np.zeros(x.shape[0], np.int64), codec)
    return decode(encode(msg)).decoded()


@pytest.mark.parametrize("name", list(_tensors()))
def test_fp32_is_exact(name: str) -> None:
    x = _tensors()[name]
    np.testing.assert_array_equal(_roundtrip(x, "fp32"), x)


@pytest.mark.parametrize("name", [n for n in _tensors() if n != "extreme_int8_range"])
def test_fp16_error_is_half_an_ulp_of_an_11_bit_significand(name: str) -> None:
    x = _tensors()[name]
    y = _roundtrip(x, "fp16")
    # round to nearest with an 11-bit significand: relative error <= 2^-11 for normal
    # values (|x| >= 2^-14); below that the subnormal spacing is 2^-24, so <= 2^-25 absolute.
    # Widening float16 -> float32 is exact, so this is the whole error.
    bound = np.maximum(2.0 ** -11 * np.abs(x), 2.0 ** -25)
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound)
    assert y.dtype == np.float32


def test_fp16_refuses_what_does_not_fit_rather_than_send_inf() -> None:
    for bad in (FP16_MAX * 1.01, -FP16_MAX * 1.01, np.nan):
        x = np.array([[1.0, bad]], np.float32)
        with pytest.raises(SmashedCodecError, match="float16"):
            encode_smashed(x, "fp16")


@pytest.mark.parametrize("name", list(_tensors()))
def test_int8_error_is_half_a_step_per_channel(name: str) -> None:
    x = _tensors()[name]
    enc = encode_smashed(x, "int8")
    assert enc.data.dtype == np.uint8 and enc.scale.shape == param_shape(x.shape)
    y = _roundtrip(x, "int8")
    axis = channel_axis(x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1  # type: ignore[index]
    scale = enc.scale.astype(np.float64).reshape(shape)
    peak = np.maximum(np.abs(enc.offset.astype(np.float64)),
                      np.abs(enc.offset + 255.0 * enc.scale)).reshape(shape)
    # exact quantization is off by <= scale/2. float32 adds: t = (x - lo) * (1/scale) takes 3
    # roundings, each <= U relative on t <= 255 (t within 3*255*U of its exact value, so the
    # rounded q is off by <= 0.5 + 3*255*U steps), scale itself is off by <= U relative
    # (255 * U steps at q = 255); decoding q*scale + lo takes 2 roundings of <= U times
    # |q*scale| <= 255*scale and |result| <= peak. A constant channel (scale 0) decodes to
    # lo exactly.
    bound = scale * (0.5 + 4 * 255 * U) + U * (255 * scale + peak) + U * peak
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound)


def _int8_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 coding one channel at a time, written as plainly as it is specified: the same
    float32 operations, so the result must be identical, not merely close."""
    axis = channel_axis(x.ndim)
    xs = np.moveaxis(x, axis, 0) if axis is not None else x[None]
    q = np.empty(xs.shape, np.uint8)
    scale = np.empty(xs.shape[0], np.float32)
    lo = np.empty(xs.shape[0], np.float32)
    tiny = np.finfo(np.float32).tiny
    for c, xc in enumerate(xs):
        lo[c], hi = xc.min(), xc.max()
        s = np.float32((np.float64(hi) - np.float64(lo[c])) / 255)
        scale[c] = max(s, tiny) if hi > lo[c] else 0  # a subnormal one's inverse overflows
        inv = np.float32(1.0) / scale[c] if scale[c] > 0 else np.float32(0)
        t = (xc - lo[c]) * inv
        q[c] = np.clip(np.rint(t), 0, 255).astype(np.uint8)
    q = np.moveaxis(q, 0, axis) if axis is not None else q[0]
    return q, scale, lo


@pytest.mark.parametrize("name", list(_tensors()))
def test_int8_equals_a_per_channel_reference(name: str) -> None:
    x = _tensors()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow to Inf, no NaN cast to uint8
        enc = encode_smashed(x, "int8")
    q, scale, lo = _int8_reference(x)
    np.testing.assert_array_equal(enc.data, q)
    np.testing.assert_array_equal(enc.scale, scale)
    np.testing.assert_array_equal(enc.offset, lo)
    assert enc.data.flags.c_contiguous


def test_int8_leaves_the_activations_as_they_were() -> None:
    x = _tensors()["random_nchw"]
    before = x.copy()
    encode_smashed(x, "int8")
    np.testing.assert_array_equal(x, before)


def test_int8_constant_and_zero_tensors_come_back_exactly() -> None:
    for name in ("constant", "zero"):
        x = _tensors()[name]
        np.testing.assert_array_equal(_roundtrip(x, "int8"), x)


def test_int8_keeps_one_scale_per_channel_of_images_and_per_feature_of_text() -> None:
    assert channel_axis(4) == 1 and channel_axis(3) == 2 and channel_axis(2) == 1
    assert param_shape((8, 16, 4, 4)) == (16,) and param_shape((8, 12, 384)) == (384,)
    assert param_shape((5,)) == (1,)


def test_int8_refuses_values_beyond_its_domain() -> None:
    with pytest.raises(SmashedCodecError, match="int8"):
        encode_smashed(np.array([[-3e38, 3e38]], np.float32), "int8")


def test_every_codec_is_smaller_on_the_wire_in_the_expected_ratio() -> None:
    x = _tensors()["random_nchw"]
    size = {c: len(encode(Smashed.coded("r", 1, "d", 0, x, np.zeros(4, np.int64), c)))
            for c in CODECS}
    data = x.size * 4
    assert size["fp32"] - size["fp16"] == data // 2  # the same header length in both
    assert size["int8"] < size["fp32"] - data * 3 // 4 + 2 * 6 * 4 + 200


def _header_swap(raw: bytes, old: bytes, new: bytes) -> bytes:
    """The message with `old` replaced by `new` in its JSON header, the length fixed up."""
    hlen = int.from_bytes(raw[4:8], "little")
    head = raw[8:8 + hlen].replace(old, new)
    assert head != raw[8:8 + hlen]
    return raw[:4] + len(head).to_bytes(4, "little") + head + raw[8 + hlen:]


def _int8_message() -> bytes:
    x = _tensors()["random_nchw"]
    return encode(Smashed.coded("run", 1, "dev-1", 0, x, np.zeros(4, np.int64), "int8"))


def test_a_missing_or_unknown_codec_is_a_clear_rejection() -> None:
    raw = _int8_message()
    with pytest.raises(CodecError, match="codec"):
        decode(_header_swap(raw, b'"codec":"int8"', b'"codec":"int4"'))
    with pytest.raises(CodecError, match=r"missing fields \['codec'\]"):
        decode(_header_swap(raw, b',"codec":"int8"', b""))


def test_a_codec_that_does_not_match_its_data_is_refused() -> None:
    raw = _int8_message()
    # says fp32 but carries uint8 (and a scale)
    with pytest.raises(CodecError, match="codec fp32 carries float32"):
        decode(_header_swap(raw, b'"codec":"int8"', b'"codec":"fp32"'))


def test_a_scale_of_the_wrong_shape_is_refused() -> None:
    x = _tensors()["random_nchw"]
    enc = encode_smashed(x, "int8")
    bad = Smashed("run", 1, "dev-1", step=0, activations=enc.data,
                  labels=np.zeros(4, np.int64), codec="int8", scale=enc.scale[:-1],
                  offset=enc.offset)
    with pytest.raises(CodecError, match=r"scale and offset must have shape \(6,\)"):
        decode(encode(bad))


@pytest.mark.parametrize("scale", [np.inf, np.nan, -1.0, 1e38])
def test_a_scale_that_is_not_finite_or_out_of_bounds_is_refused(scale: float) -> None:
    x = _tensors()["random_nchw"]
    enc = encode_smashed(x, "int8")
    s = enc.scale.copy()
    s[0] = scale
    bad = Smashed("run", 1, "dev-1", step=0, activations=enc.data,
                  labels=np.zeros(4, np.int64), codec="int8", scale=s, offset=enc.offset)
    with pytest.raises(CodecError, match="smashed"):
        decode(encode(bad))
    with pytest.raises(SmashedCodecError):
        decode_smashed("int8", enc.data, s, enc.offset)


def test_fp16_with_nan_is_refused_at_the_boundary() -> None:
    data = np.array([[1.0, np.nan]], np.float16)
    bad = Smashed("run", 1, "dev-1", step=0, activations=data, labels=np.zeros(1, np.int64),
                  codec="fp16")
    with pytest.raises(CodecError, match="NaN"):
        decode(encode(bad))
