"""heron's protocol: topics, message kinds, their wire format and the training config.

Imports nothing heavier than numpy, so the server, the fleet tools and the torch device can
share the device's wire types without its ONNX Runtime, psutil or paho dependencies.

    fields    bounded field parsers and their limits, CodecError
    records   Telemetry, JoinProfile, ServerInfo (records inside messages)
    messages  the message kinds (Presence, Join, BundleFiles, RoundStart, ...)
    codec     encode / decode: the binary wire format
    chunks    chunk / Reassembler: messages cut into MQTT payloads and rebuilt
    topics    every MQTT topic, built by functions
    config    TrainConfig, ZOConfig, OptimizerConfig and their defaults
"""

from edge_runtime.protocol import topics
from edge_runtime.protocol.chunks import (
    CHUNK_MAGIC,
    MAX_CHUNK_PAYLOAD,
    PARTIAL_OVERHEAD,
    PIECE_OVERHEAD,
    Reassembler,
    chunk,
    wire_bytes,
)
from edge_runtime.protocol.codec import DTYPES, MAGIC, decode, encode
from edge_runtime.protocol.config import (
    OptimizerConfig,
    TrainConfig,
    ZOConfig,
)
from edge_runtime.protocol.fields import MAX_MESSAGE_BYTES, CodecError
from edge_runtime.protocol.messages import (
    KINDS,
    BundleFiles,
    DeviceError,
    Gradient,
    Join,
    Message,
    Presence,
    RoundStart,
    Smashed,
    Stop,
    Update,
    WeightsReply,
    WeightsRequest,
    max_bytes,
    new_msg_id,
)
from edge_runtime.protocol.records import (
    JoinProfile,
    ServerInfo,
    Telemetry,
    announced_train,
    server_info,
)

__all__ = [
    "CHUNK_MAGIC", "DTYPES", "KINDS", "MAGIC", "MAX_CHUNK_PAYLOAD", "MAX_MESSAGE_BYTES",
    "PARTIAL_OVERHEAD", "PIECE_OVERHEAD", "BundleFiles", "CodecError", "DeviceError", "Gradient",
    "Join",
    "JoinProfile", "Message", "OptimizerConfig", "Presence", "Reassembler", "RoundStart",
    "ServerInfo", "Smashed", "Stop", "Telemetry", "TrainConfig", "Update", "WeightsReply",
    "WeightsRequest", "ZOConfig",
    "announced_train", "chunk", "decode", "encode", "max_bytes", "new_msg_id", "server_info",
    "topics", "wire_bytes",
]
