"""The device: a federation participant that trains on its own shard and talks to the server
over a `Transport` (MQTT from `heron device`).

    options     DeviceOptions, and how a round or the loop ends early
    bus         the device on the bus: its endpoint, whom it obeys, its largest message, MQTT
    records     the config it reads from the server's presence; its join profile and telemetry
    loop        DeviceLoop: join, take the bundle, train the rounds it is picked for
    ort_device  Device: the loop with an ONNX Runtime model; run_device, `heron device`'s entry
"""

from edge_runtime.device.bus import device_endpoint, message_limit, mqtt_transport, server_kinds
from edge_runtime.device.loop import DeviceLoop
from edge_runtime.device.options import DeviceExit, DeviceOptions, RoundAborted
from edge_runtime.device.ort_device import Device, run_device
from edge_runtime.device.records import announced_config, join_profile, round_telemetry

__all__ = ["Device", "DeviceExit", "DeviceLoop", "DeviceOptions", "RoundAborted",
           "announced_config", "device_endpoint", "join_profile", "message_limit",
           "mqtt_transport", "round_telemetry", "run_device", "server_kinds"]
