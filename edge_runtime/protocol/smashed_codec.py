"""Smashed-data codecs: how a device shrinks cut-layer activations before they go up.

Pure numpy, used by the device (encode) and the server (check and decode). The codec id and
its parameters travel in the `Smashed` message; `check` is the boundary that refuses a
header that does not fit its data.

- fp32: the activations as they are.
- fp16: half precision. |decoded - x| <= 2^-11 |x| for |x| >= 2^-14 (round to nearest with
  an 11-bit significand), <= 2^-25 below (subnormal spacing 2^-24, halved). Values beyond
  65504 do not fit: encoding refuses them rather than send Inf.
- int8: one scale and offset per channel (axis 1 of NCHW images, the last axis otherwise:
  features of [B,F] or [B,T,F]); x ~ offset + q * scale with q in 0..255 (uint8 on the
  wire, the name being the usual one for 8-bit quantization). |decoded - x| <= scale/2 in
  exact arithmetic, plus a few float32 roundings (derived in the tests).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CODECS = ("fp32", "fp16", "int8")
# int8: a quarter of fp32's bytes with no measured accuracy cost on image and text
# workloads (BENCHMARKS.md, "Smashed-data codecs"); fp16 saves half as much at more device time
DEFAULT_CODEC = "int8"
WIRE_DEFAULT = "fp32"  # what a training config without the field means (servers before codecs)
WIRE_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "uint8"}
FP16_MAX = 65504.0
MAX_ABS = 1e30  # int8's domain: hi - lo stays finite in float32 with room to spare
LEVELS = 255
TINY = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32


class SmashedCodecError(ValueError):
    """Activations a codec cannot carry, or a header that does not fit its data."""


class Encoded(NamedTuple):
    """What goes on the wire: the codec id, the coded array and the int8 parameters (empty
    float32 arrays for fp32 and fp16)."""

    codec: str
    data: np.ndarray
    scale: np.ndarray
    offset: np.ndarray


def _none() -> np.ndarray:
    return np.zeros(0, np.float32)


def channel_axis(ndim: int) -> int | None:
    """Axis int8 keeps one scale per index of: 1 for NCHW, the last for [B,F] / [B,T,F];
    None (one scale for the tensor) for a 1-d array."""
    if ndim < 2:
        return None
    return 1 if ndim == 4 else ndim - 1


def param_shape(shape: tuple[int, ...]) -> tuple[int]:
    """The shape of int8's scale and offset for activations of `shape`."""
    axis = channel_axis(len(shape))
    return (1,) if axis is None else (shape[axis],)


def _broadcast(p: np.ndarray, ndim: int) -> np.ndarray:
    axis = channel_axis(ndim)
    if axis is None:
        return p.reshape(())
    shape = [1] * ndim
    shape[axis] = p.shape[0]
    return p.reshape(shape)


def encode(x: np.ndarray, codec: str) -> Encoded:
    """Activations (float32, finite) -> what the codec sends; SmashedCodecError if they do
    not fit it."""
    if codec not in CODECS:
        raise SmashedCodecError(f"unknown smashed codec {codec!r}; help: one of {CODECS}")
    x = np.asarray(x, dtype=np.float32)
    if codec == "fp32":
        return Encoded(codec, x, _none(), _none())
    if x.size == 0:
        raise SmashedCodecError("no activations to encode")
    if codec == "fp16":
        lo, hi = float(x.min()), float(x.max())  # NaN propagates into both
        if not (-FP16_MAX <= lo and hi <= FP16_MAX):
            raise SmashedCodecError(f"activations span [{lo:g}, {hi:g}], beyond float16's "
                                    f"{FP16_MAX:g}; help: --smashed-codec int8 or fp32")
        return Encoded(codec, x.astype(np.float16), _none(), _none())
    axis = channel_axis(x.ndim)
    if x.ndim == 4:  # NCHW as one contiguous row per channel: [C, B*H*W] (see below)
        moved = np.moveaxis(x, 1, 0)
        t = moved.copy().reshape(x.shape[1], -1)
        lo, hi = t.min(axis=1), t.max(axis=1)
    else:  # features last: numpy's inner loops already run along them
        others = tuple(i for i in range(x.ndim) if i != axis)
        lo, hi = np.atleast_1d(x.min(axis=others)), np.atleast_1d(x.max(axis=others))
        t = None
    if not (np.all(np.abs(lo) <= MAX_ABS) and np.all(np.abs(hi) <= MAX_ABS)):
        raise SmashedCodecError(f"activations beyond |{MAX_ABS:g}| (or not finite) cannot "
                                "be int8-coded; help: --smashed-codec fp32")
    lo = lo.astype(np.float32)
    scale = ((hi.astype(np.float64) - lo) / LEVELS).astype(np.float32)
    # a range under 255 * TINY would give a subnormal (or zero) scale whose inverse
    # overflows to Inf (0 * Inf = NaN, cast to uint8 as anything): such a channel gets scale
    # TINY, which still spans it, so the error bound holds; a constant one has scale 0, q = 0
    scale = np.where(hi > lo, np.maximum(scale, TINY), np.float32(0)).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    # One temporary, shifted, scaled, rounded and clipped in place: the device codes every
    # k-th step (on its uplink thread; BENCHMARKS.md, device cost). For NCHW it is
    # channel-major, so each channel's min, max and broadcast run over one contiguous row of
    # B*H*W values rather than rows of W (numpy's inner loops): about 1.5x faster on conv
    # activations of 16-32 channels.
    if t is None:
        t = np.subtract(x, _broadcast(lo, x.ndim))
        t *= _broadcast(inv, x.ndim)
    else:
        t -= lo[:, None]
        t *= inv[:, None]
    np.rint(t, out=t)
    np.clip(t, 0, LEVELS, out=t)
    q = t.astype(np.uint8)
    if x.ndim == 4:
        q = np.ascontiguousarray(np.moveaxis(q.reshape(moved.shape), 0, 1))
    return Encoded(codec, q, scale, lo)


def check(codec: str, data: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> str | None:
    """Why a received (codec, data, scale, offset) is not a valid encoding, or None."""
    if codec not in CODECS:
        return f"unknown smashed codec {codec!r}; expected one of {CODECS}"
    want = WIRE_DTYPES[codec]
    if data.dtype != np.dtype(want):
        return f"codec {codec} carries {want} activations, got {data.dtype}"
    if codec != "int8":
        if scale.size or offset.size:
            return f"codec {codec} takes no scale or offset, got shapes {scale.shape} and " \
                   f"{offset.shape}"
        return None
    shape = param_shape(data.shape)
    if scale.shape != shape or offset.shape != shape:
        return (f"int8 scale and offset must have shape {shape} for activations of shape "
                f"{data.shape}, got {scale.shape} and {offset.shape}")
    if scale.dtype != np.float32 or offset.dtype != np.float32:
        return "int8 scale and offset must be float32"
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(offset))):
        return "int8 scale or offset is NaN or Inf"
    if np.any(scale < 0) or np.any(scale > 2 * MAX_ABS / LEVELS) or \
            np.any(np.abs(offset) > MAX_ABS):
        return f"int8 scale outside [0, {2 * MAX_ABS / LEVELS:g}] or offset beyond " \
               f"|{MAX_ABS:g}|"
    return None


def decode(codec: str, data: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """A checked encoding -> float32 activations (SmashedCodecError if `check` objects)."""
    why = check(codec, data, scale, offset)
    if why:
        raise SmashedCodecError(why)
    if codec == "fp32":
        return data
    if codec == "fp16":
        return data.astype(np.float32)
    n = data.ndim
    return (data.astype(np.float32) * _broadcast(scale, n) +
            _broadcast(offset, n)).astype(np.float32, copy=False)
