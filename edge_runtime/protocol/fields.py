"""The bounded field parsers every message and record is checked with, and their limits.

A parser is ``(where, value) -> typed value`` and raises :class:`CodecError` naming `where`,
e.g. ``update.telemetry.loss_mean: nan is not a finite number``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from edge_runtime.protocol.topics import is_id

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # the largest kind's limit (a bundle)

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

RUN_ID = re.compile(r"[A-Za-z0-9_.-]{0,64}")
MSG_ID = re.compile(r"[0-9a-f]{32}")
SHA256 = re.compile(r"[0-9a-f]{64}")
WEIGHTS_HASH = re.compile(r"[0-9a-f]{32}")  # 16 bytes of a sha256 (edge_runtime.replay)
MAX_LOG = 1 << 22  # (seed, projected) pairs in one update: steps x directions, 48 MB
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # algorithm, model, board profile
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a config key
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a plain file name, no directories


class CodecError(ValueError):
    """A payload that cannot be decoded: malformed, truncated, oversized, unknown kind, or a
    field out of its bounds. The message names the kind and the field."""


class UnexpectedInput(CodecError):
    """Input that no explicit check named (a decoder bug if it ever shows); still a
    CodecError so one payload cannot stop a receiver, but the fuzz tests look for it."""


# -- field parsers: (where, value) -> typed value, or CodecError naming `where` -------------

def integer(lo: int, hi: int) -> Callable[[str, Any], int]:
    def parse(where: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise CodecError(f"{where}: {show(v)} is not an integer")
        if not lo <= int(v) <= hi:
            raise CodecError(f"{where}: {show(v)} is outside {lo}..{hi}")
        return int(v)
    return parse


def real(lo: float, hi: float) -> Callable[[str, Any], float]:
    def parse(where: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise CodecError(f"{where}: {show(v)} is not a number")
        if isinstance(v, (float, np.floating)) and not math.isfinite(v):
            raise CodecError(f"{where}: {show(v)} is not a finite number")
        if not lo <= v <= hi:  # exact for ints of any size, before float() could overflow
            raise CodecError(f"{where}: {show(v)} is outside {lo:g}..{hi:g}")
        return float(v)
    return parse


def boolean(where: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise CodecError(f"{where}: {show(v)} is not true or false")
    return bool(v)


def matching(pattern: re.Pattern[str] | Callable[[str], bool], what: str
           ) -> Callable[[str, Any], str]:
    """A string that matches `pattern` whole (or passes it, if it is a function)."""
    ok = pattern if callable(pattern) else (lambda s: pattern.fullmatch(s) is not None)

    def parse(where: str, v: Any) -> str:
        if not isinstance(v, str) or not ok(v):
            raise CodecError(f"{where}: {show(v)} is not {what}")
        return v
    return parse


def free_text(max_chars: int) -> Callable[[str, Any], str]:
    """Free text: printable characters, newlines and tabs (no escapes that rewrite a log)."""
    def parse(where: str, v: Any) -> str:
        if not isinstance(v, str):
            raise CodecError(f"{where}: {show(v)} is not a string")
        if len(v) > max_chars:
            raise CodecError(f"{where}: {len(v)} characters, more than {max_chars}")
        if not all(c.isprintable() or c in "\n\t" for c in v):
            raise CodecError(f"{where}: contains control or unpaired surrogate characters")
        return v
    return parse


def choice(*options: str) -> Callable[[str, Any], str]:
    def parse(where: str, v: Any) -> str:
        if v not in options or not isinstance(v, str):
            raise CodecError(f"{where}: {show(v)} is not one of {', '.join(options)}")
        return v
    return parse


def id_list(max_items: int) -> Callable[[str, Any], tuple[str, ...]]:
    def parse(where: str, v: Any) -> tuple[str, ...]:
        if not isinstance(v, (list, tuple)) or len(v) > max_items:
            raise CodecError(f"{where}: expected a list of at most {max_items} ids")
        out = tuple(matching(is_id, "a device id")(f"{where}[{i}]", x) for i, x in enumerate(v))
        if len(set(out)) != len(out):
            raise CodecError(f"{where}: lists an id twice")
        return out
    return parse


def optional(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def opt(where: str, v: Any) -> Any:
        return None if v is None else parse(where, v)
    return opt


def show(v: Any) -> str:
    """A value for an error message, never longer than a line."""
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def config_object(where: str, v: Any, depth: int = 1) -> dict[str, Any]:
    """A training config as JSON: objects of scalars, nested at most MAX_CONFIG_DEPTH deep.
    Its meaning (TrainConfig.from_json) is checked by the device that runs it."""
    if not isinstance(v, dict):
        raise CodecError(f"{where}: {show(v)} is not an object")
    if len(v) > MAX_CONFIG_KEYS:
        raise CodecError(f"{where}: {len(v)} keys, more than {MAX_CONFIG_KEYS}")
    out: dict[str, Any] = {}
    for key, x in v.items():
        at = f"{where}.{show(key) if not isinstance(key, str) else key[:64]}"
        if not isinstance(key, str) or KEY.fullmatch(key) is None:
            raise CodecError(f"{at}: not a config key (letters, digits, '_')")
        if isinstance(x, dict):
            if depth >= MAX_CONFIG_DEPTH:
                raise CodecError(f"{at}: nested deeper than {MAX_CONFIG_DEPTH}")
            out[key] = config_object(at, x, depth + 1)
        elif x is None or isinstance(x, bool):
            out[key] = x
        elif isinstance(x, int):
            out[key] = integer(-(2**63), 2**64 - 1)(at, x)
        elif isinstance(x, float):
            out[key] = real(-1e300, 1e300)(at, x)
        elif isinstance(x, str):
            out[key] = free_text(MAX_TEXT_CHARS)(at, x)
        else:
            raise CodecError(f"{at}: {show(x)} is not a number, string, boolean or object")
    return out


class Field(NamedTuple):
    parse: Callable[[str, Any], Any]
    required: bool = True


def check_record(obj: Any, where: str, spec: Mapping[str, Field]) -> dict[str, Any]:
    """A JSON object holding exactly the record's fields (optional ones may be absent or
    null), each parsed. Unknown keys are refused, not dropped: see Telemetry."""
    if not isinstance(obj, Mapping):
        raise CodecError(f"{where}: {show(obj)} is not an object")
    unknown = [k for k in obj if k not in spec]
    if unknown:
        raise CodecError(f"{where}: unknown fields {show(sorted(map(str, unknown)))}")
    out = {}
    for name, f in spec.items():
        if name not in obj or obj[name] is None:
            if f.required:
                raise CodecError(f"{where}.{name}: missing")
            out[name] = None
        else:
            out[name] = f.parse(f"{where}.{name}", obj[name])
    return out



def name_list(where: str, v: Any, max_items: int) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= max_items:
        raise CodecError(f"{where}: expected a list of 1..{max_items} names")
    return tuple(matching(NAME, "a name")(f"{where}[{i}]", x) for i, x in enumerate(v))



def file_names(where: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or len(v) > MAX_BUNDLE_FILES:
        raise CodecError(f"{where}: expected a list of at most {MAX_BUNDLE_FILES} file names")
    out = tuple(matching(FILE_NAME, "a plain file name")(f"{where}[{i}]", x)
                for i, x in enumerate(v))
    if len(set(out)) != len(out):
        raise CodecError(f"{where}: names a file twice")
    return out



def clean_text(text: str, max_chars: int) -> str:
    """What a sender does to free text so that the receiver's bounds always hold."""
    text = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in str(text))
    return text if len(text) <= max_chars else text[:max_chars - 3] + "..."

