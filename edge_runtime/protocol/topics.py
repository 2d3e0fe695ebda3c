"""Every MQTT topic heron uses, built by functions so no call site glues strings.

Layout under a prefix (default ``heron``)::

    {p}/server/status              server → all   retained: run id, state (online/offline)
    {p}/status/{device}            device → all   retained: online/offline (offline = last will)
    {p}/up/{device}/join           device → server  hello: profile, runtime versions
    {p}/up/{device}/smashed        device → server  cut-layer activations + labels
    {p}/up/{device}/update         device → server  round-end weights, sample count, telemetry
    {p}/up/{device}/error          device → server  an error the device could not recover from
    {p}/down/{device}/bundle       server → device  the device bundle (manifest, graph, weights)
    {p}/down/{device}/grad         server → device  SplitFed: cut-layer gradient for one step
    {p}/down/all/round             server → all     round start: global weights, config, roster
    {p}/down/all/stop              server → all     run finished, devices may exit

Devices write only under ``up/{own id}`` and ``status/{own id}`` and read only
``down/{own id}`` and ``down/all``, which is what a broker ACL can enforce.
"""

from __future__ import annotations

import re

DEFAULT_PREFIX = "heron"
ALL = "all"
UP_KINDS = ("join", "smashed", "update", "weights_reply", "error")
DOWN_DEVICE_KINDS = ("bundle", "grad", "weights_request")
DOWN_ALL_KINDS = ("round", "stop")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_id(device_id: str) -> bool:
    return _ID.fullmatch(device_id) is not None and device_id != ALL


def validate_id(device_id: str) -> str:
    """Device ids become topic levels, so they may not contain MQTT wildcards or slashes."""
    if not is_id(device_id):
        raise ValueError(
            f"device id {device_id!r} is not allowed; help: use 1-64 characters from "
            "letters, digits, '_', '-', '.', starting with a letter or digit, and not 'all'")
    return device_id


def validate_prefix(prefix: str) -> str:
    if not prefix or any(c in prefix for c in "#+") or prefix.startswith("/") or \
            prefix.endswith("/"):
        raise ValueError(f"topic prefix {prefix!r} must be non-empty, without '#', '+' "
                         "or a leading/trailing '/'")
    return prefix


def server_status(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/server/status"


def device_status(device_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/status/{validate_id(device_id)}"


def up(device_id: str, kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    if kind not in UP_KINDS:
        raise ValueError(f"unknown uplink kind {kind!r}")
    return f"{prefix}/up/{validate_id(device_id)}/{kind}"


def down_device(device_id: str, kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    if kind not in DOWN_DEVICE_KINDS:
        raise ValueError(f"unknown downlink kind {kind!r}")
    return f"{prefix}/down/{validate_id(device_id)}/{kind}"


def down_all(kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    if kind not in DOWN_ALL_KINDS:
        raise ValueError(f"unknown broadcast kind {kind!r}")
    return f"{prefix}/down/{ALL}/{kind}"


def server_subscriptions(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """What the server listens to: every device's uplink and presence."""
    return [f"{prefix}/up/+/+", f"{prefix}/status/+"]


def device_subscriptions(device_id: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """What a device listens to: its own downlink, broadcasts and the server's presence."""
    return [f"{prefix}/down/{validate_id(device_id)}/+", f"{prefix}/down/{ALL}/+",
            server_status(prefix)]


def parse_up(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str] | None:
    """(device id, kind) for an uplink topic, or None if it is not one of ours."""
    parts = topic.split("/")
    head = prefix.split("/")
    if parts[:len(head)] != head:
        return None
    rest = parts[len(head):]
    if len(rest) == 3 and rest[0] == "up" and rest[2] in UP_KINDS and is_id(rest[1]):
        return rest[1], rest[2]
    return None


def parse_status(topic: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """Device id for a device presence topic, else None."""
    parts = topic.split("/")
    head = prefix.split("/")
    rest = parts[len(head):]
    if parts[:len(head)] == head and len(rest) == 2 and rest[0] == "status" and \
            is_id(rest[1]):
        return rest[1]
    return None


def payload_kind(topic: str) -> str | None:
    """The message kind one of our topics carries, read from its last levels whatever the
    prefix; None for any other topic. Lets a receiver apply a kind's size limit while it
    reassembles; the decoded message's kind is still checked against the topic."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[-3] == "up" and parts[-1] in UP_KINDS:
        return parts[-1]
    if len(parts) >= 3 and parts[-3] == "down" and \
            parts[-1] in (*DOWN_DEVICE_KINDS, *DOWN_ALL_KINDS):
        return parts[-1]
    if len(parts) >= 2 and (parts[-2] == "status" or parts[-2:] == ["server", "status"]):
        return "presence"
    return None

