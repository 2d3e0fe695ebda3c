"""The device on the bus: who it is (`device_endpoint`), whom it obeys (`server_kinds`), the
largest message it takes (`message_limit`) and the MQTT connection `heron device` makes.

Whom a device obeys. It acts only on the kinds the server sends, each on its own topic
(`server_kinds`: the retained server presence, ``down/{own id}/bundle|grad|weights_request``,
``down/all/round|stop``) with sender "server", and only for the run it joined: the run id
comes from the server's online presence on the retained server status topic and from nowhere
else. A bundle, round, gradient or stop for another run, a kind on the wrong topic or a
payload that does not decode is ignored, counted in `Device.ignored` and logged, never a
crash (only a bundle of the joined run that cannot be received or verified ends the device:
it reports why to the server and exits 4). What that proves about the sender depends on the
broker:

- provisioned (`heron devices provision`): the broker refuses anonymous clients, its ACL
  lets only the server's account write under ``down/`` and ``server/status`` while each
  device writes only its own ``up/`` and ``status/`` topics, and client ids are the user
  names (`tests/test_security.py` checks each against a real Mosquitto). So whatever a
  device acts on was published with the server's credentials, and the run is the one that
  account announced last: that is the server's identity. With ``--tls`` the device also
  checks the broker's certificate against the fleet's CA; without TLS a machine on the
  network path could pose as the broker.
- an open broker: anyone who connects can publish as the server (the run id is in its
  retained presence for all to read); the run-id check then only keeps stale and other
  runs' traffic out.

Either way a bundle cannot make the device read or write outside the bundle's folder
(`edge_runtime.bundle`: external data confinement, checked before any session exists), and
a message larger than the device's memory budget can hold is refused at its first chunk
(`message_limit`).
"""

from __future__ import annotations

import psutil

from edge_runtime.device.options import DeviceOptions
from edge_runtime.profiles import Profile, memory_budget
from edge_runtime.protocol import (
    MAX_CHUNK_PAYLOAD,
    MAX_MESSAGE_BYTES,
    BundleFiles,
    Gradient,
    Message,
    Presence,
    RoundStart,
    Stop,
    WeightsRequest,
    topics,
)
from edge_runtime.transport import Endpoint, Transport


def server_kinds(device_id: str, prefix: str) -> dict[str, type[Message]]:
    """topic -> the one message kind the server sends there (module doc)."""
    return {topics.server_status(prefix): Presence,
            topics.down_device(device_id, "bundle", prefix): BundleFiles,
            topics.down_device(device_id, "grad", prefix): Gradient,
            topics.down_device(device_id, "weights_request", prefix): WeightsRequest,
            topics.down_all("round", prefix): RoundStart,
            topics.down_all("stop", prefix): Stop}


def message_limit(profile: Profile | None) -> int:
    """The largest message, in bytes, this device takes: half of what its memory budget
    (`profiles.memory_budget`) leaves above what the process holds now, since a bundle
    verified in memory is held twice for a moment (the message and its files); at least one
    chunk, so presences and small rounds always pass, and at most the codec's limit. A
    bundle over it is refused at its first chunk, before any of it is held."""
    budget_mb, _ = memory_budget(profile)
    room = int(budget_mb * 2**20) - psutil.Process().memory_info().rss
    return max(MAX_CHUNK_PAYLOAD, min(MAX_MESSAGE_BYTES, room // 2))


def device_endpoint(device_id: str, prefix: str) -> Endpoint:
    """The device on the bus: its downlinks, broadcasts and the server's presence; an
    offline presence as its will."""
    return Endpoint(f"heron-{device_id}", topics.device_subscriptions(device_id, prefix),
                    (topics.device_status(device_id, prefix),
                     Presence("", -1, device_id, state="offline")))


def mqtt_transport(opts: DeviceOptions, max_message_bytes: int) -> Transport:
    """The device's MQTT connection, as `heron device` makes it."""
    from edge_runtime.transport.mqtt import MqttTransport

    ep = device_endpoint(opts.device_id, opts.prefix)
    return MqttTransport(opts.broker, ep.client_id, ep.subscriptions, will=ep.will,
                         credentials=opts.credentials, max_message_bytes=max_message_bytes)
