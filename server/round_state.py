"""The round in progress, as the loop, admission and the records see it."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_runtime.protocol import Gradient, RoundStart, Telemetry, Update
from server.aggregate import DeviceUpdate


@dataclass
class RoundState:
    """The round in progress: who takes part, what has come in, who left."""

    participants: tuple[str, ...]
    start: RoundStart
    min_devices: int | None = None
    updates: dict[str, DeviceUpdate] = field(default_factory=dict)
    telemetry: dict[str, Telemetry] = field(default_factory=dict)
    server_losses: list[float] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)
    grads: dict[tuple[str, int], Gradient] = field(default_factory=dict)  # SplitFed replies
    smashed: dict[str, int] = field(default_factory=dict)  # device -> uploads this round
    clipped: list[str] = field(default_factory=list)  # devices whose update was clipped
    seconds_training: float = 0.0  # server steps on smashed data, while the round is open
    replay_ms: dict[str, float] = field(default_factory=dict)  # --device-sync replay: cost
    # --device-sync replay: devices whose log did not replay to their hash, asked for their
    # weights; their update (sample count, telemetry) waits here for the weights
    replay_mismatch: dict[str, Update] = field(default_factory=dict)
    weights_fallback: list[str] = field(default_factory=list)  # whose weights then came

    def finished(self) -> bool:
        """Every live participant reported, or the configured minimum did."""
        if self.min_devices is not None and len(self.updates) >= self.min_devices:
            return True
        return all(p in self.updates or p in self.gone for p in self.participants)
