"""What a device is started with (`DeviceOptions`, one field per `heron device` flag) and
the two ways its work stops early: a round it cannot finish, a loop it must end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_runtime.profiles import Profile
from edge_runtime.protocol import topics
from edge_runtime.transport import Credentials


@dataclass(frozen=True)
class DeviceOptions:
    broker: str
    device_id: str
    data: Path
    prefix: str = topics.DEFAULT_PREFIX
    bundle: Path | None = None  # a local bundle instead of the server's
    threads: int | None = None
    credentials: Credentials | None = None
    wait_server_s: float = 600.0  # give up if no server shows up for this long
    profile: Profile | None = None  # board profile: memory budget (and default threads)
    # where bundles from the server are stored when their graph data must be on disk to be
    # memory-mapped (None: bundle.default_bundle_cache())
    bundle_cache: Path | None = None


class RoundAborted(Exception):
    """The round cannot go on (no gradient from the server, server gone); no update is sent."""


class DeviceExit(Exception):
    """Raised to end the device loop with a message and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
