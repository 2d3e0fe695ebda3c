"""Topic table: each topic reaches exactly the subscribers it is meant for, ids are safe."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from paho.mqtt.client import topic_matches_sub

from edge_runtime.protocol import topics

DEVICES = ("dev-0", "dev-1", "Board_7.a")
SERVER = "server"
PREFIXES = ("heron", "lab/heron-2")


def _subscriptions(who: str, prefix: str) -> list[str]:
    if who == SERVER:
        return topics.server_subscriptions(prefix)
    return topics.device_subscriptions(who, prefix)


def _table(prefix: str) -> list[tuple[str, set[str]]]:
    """(topic, who must receive it) for every topic the functions can build."""
    everyone_but_server = set(DEVICES)
    rows: list[tuple[str, set[str]]] = [(topics.server_status(prefix), everyone_but_server)]
    for dev in DEVICES:
        rows.append((topics.device_status(dev, prefix), {SERVER}))
        rows += [(topics.up(dev, kind, prefix), {SERVER}) for kind in topics.UP_KINDS]
        rows += [(topics.down_device(dev, kind, prefix), {dev})
                 for kind in topics.DOWN_DEVICE_KINDS]
    rows += [(topics.down_all(kind, prefix), everyone_but_server)
             for kind in topics.DOWN_ALL_KINDS]
    return rows


def test_table_covers_every_kind() -> None:
    rows = _table("heron")
    n = len(DEVICES)
    assert len(rows) == 1 + n * (1 + len(topics.UP_KINDS) + len(topics.DOWN_DEVICE_KINDS)) + \
        len(topics.DOWN_ALL_KINDS)
    assert len({t for t, _ in rows}) == len(rows)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("who", (SERVER, *DEVICES))
def test_each_topic_matches_exactly_the_intended_subscribers(prefix: str, who: str) -> None:
    subs = _subscriptions(who, prefix)
    for topic, receivers in _table(prefix):
        hits = [s for s in subs if topic_matches_sub(s, topic)]
        if who in receivers:
            assert len(hits) == 1, f"{who} should get {topic} once, matched by {hits}"
        else:
            assert hits == [], f"{who} must not get {topic}, matched by {hits}"


def test_device_gets_own_downlink_and_broadcasts_but_not_other_devices_or_uplinks() -> None:
    subs = topics.device_subscriptions("dev-0")

    def gets(topic: str) -> bool:
        return any(topic_matches_sub(s, topic) for s in subs)

    assert gets("heron/down/dev-0/bundle")
    assert gets("heron/down/all/round") and gets("heron/down/all/stop")
    assert gets("heron/server/status")
    assert not gets("heron/down/dev-1/bundle")
    assert not gets("heron/down/dev-00/bundle")
    assert not gets("heron/up/dev-0/update")
    assert not gets("heron/status/dev-0")
    assert not gets("other/down/dev-0/bundle")


def test_server_gets_every_uplink_and_status_but_no_downlink() -> None:
    subs = topics.server_subscriptions()

    def gets(topic: str) -> bool:
        return any(topic_matches_sub(s, topic) for s in subs)

    assert all(gets(topics.up(d, k)) for d in DEVICES for k in topics.UP_KINDS)
    assert all(gets(topics.device_status(d)) for d in DEVICES)
    assert not gets(topics.down_device("dev-0", "bundle"))
    assert not any(gets(topics.down_all(k)) for k in topics.DOWN_ALL_KINDS)
    assert not gets(topics.server_status())  # its own retained status
    assert not gets("heron/up/dev-0/update/extra")
    assert not gets("heron2/up/dev-0/update")


def test_subscriptions_hold_no_other_prefix() -> None:
    for who in (SERVER, "dev-0"):
        for topic, _ in _table("heron"):
            assert not any(topic_matches_sub(s, topic) for s in _subscriptions(who, "lab"))


# --- parsing -------------------------------------------------------------------------------

IDS_OK = ("dev-0", "a", "A1", "x" * 64, "board.7_b-c", "0")


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("dev", IDS_OK)
def test_parse_up_and_parse_status_round_trip(prefix: str, dev: str) -> None:
    for kind in topics.UP_KINDS:
        assert topics.parse_up(topics.up(dev, kind, prefix), prefix) == (dev, kind)
    assert topics.parse_status(topics.device_status(dev, prefix), prefix) == dev


FOREIGN = [
    "heron/down/dev-0/bundle",
    "heron/down/all/round",
    "heron/status/dev-0",
    "heron/server/status",
    "heron/up/dev-0/bundle",
    "heron/up/dev-0",
    "heron/up/dev-0/update/x",
    "heron/up//update",
    "heron/up/+/update",
    "heron/up/#",
    "heron/up/-dev/update",
    "other/up/dev-0/update",
    "heronx/up/dev-0/update",
    "up/dev-0/update",
    "lab/heron/up/dev-0/update",
    "",
]


@pytest.mark.parametrize("topic", FOREIGN)
def test_parse_up_rejects_foreign_topics(topic: str) -> None:
    assert topics.parse_up(topic) is None


@pytest.mark.parametrize("topic", [
    "heron/server/status", "heron/status", "heron/status/dev-0/x", "heron/status/+",
    "heron/status/", "other/status/dev-0", "heron/up/dev-0/join", "lab/heron/status/dev-0", "",
])
def test_parse_status_rejects_foreign_topics(topic: str) -> None:
    assert topics.parse_status(topic) is None


def test_parse_respects_a_multi_level_prefix() -> None:
    assert topics.parse_up("lab/heron/up/dev-0/join", "lab/heron") == ("dev-0", "join")
    assert topics.parse_up("heron/up/dev-0/join", "lab/heron") is None
    assert topics.parse_status("lab/heron/status/dev-0", "lab/heron") == "dev-0"
    assert topics.parse_status("lab/status/dev-0", "lab/heron") is None


@pytest.mark.parametrize("topic", ["heron/up/all/join", "heron/status/all", "heron/up/dev\n/join",
                                   "heron/status/dev\n"])
def test_parse_refuses_ids_that_validate_id_refuses(topic: str) -> None:
    """A join on up/all/join once crashed the server: down_device('all') raised."""
    assert topics.parse_up(topic) is None and topics.parse_status(topic) is None


# --- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("dev", IDS_OK)
def test_validate_id_accepts_plain_ids(dev: str) -> None:
    assert topics.validate_id(dev) == dev


@pytest.mark.parametrize("dev", ["+", "#", "/", "", "all", "x" * 65, "dev/0", "dev+", "dev#",
                                 "a b", "-dev", ".dev", "_dev", "dév", "dev\x00"])
def test_validate_id_rejects_unsafe_ids(dev: str) -> None:
    with pytest.raises(ValueError, match="help:"):
        topics.validate_id(dev)


def test_validate_id_rejects_a_trailing_newline() -> None:
    with pytest.raises(ValueError):
        topics.validate_id("dev-0\n")


@pytest.mark.parametrize("dev", [*IDS_OK, "+", "#", "all", "", "dev-0\n", "x" * 65, "a/b"])
def test_is_id_agrees_with_validate_id(dev: str) -> None:
    try:
        topics.validate_id(dev)
        valid = True
    except ValueError:
        valid = False
    assert topics.is_id(dev) is valid


@pytest.mark.parametrize("build", [
    lambda d: topics.device_status(d),
    lambda d: topics.up(d, "join"),
    lambda d: topics.down_device(d, "bundle"),
    lambda d: topics.device_subscriptions(d),
])
@pytest.mark.parametrize("dev", ["+", "#", "all", "a/b", ""])
def test_builders_validate_device_ids(build: Callable[[str], object], dev: str) -> None:
    with pytest.raises(ValueError):
        build(dev)


def test_builders_reject_unknown_kinds() -> None:
    with pytest.raises(ValueError):
        topics.up("dev-0", "bundle")
    with pytest.raises(ValueError):
        topics.down_device("dev-0", "round")
    with pytest.raises(ValueError):
        topics.down_all("bundle")


@pytest.mark.parametrize("prefix", ["heron", "lab/heron", "a.b-c_d", "x"])
def test_validate_prefix_accepts(prefix: str) -> None:
    assert topics.validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "#", "+", "heron/#", "a/+/b", "/heron", "heron/", "/"])
def test_validate_prefix_rejects(prefix: str) -> None:
    with pytest.raises(ValueError):
        topics.validate_prefix(prefix)
