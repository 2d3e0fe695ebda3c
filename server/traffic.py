"""Where a run's bytes go: the server's byte counts split by what they carry.

`bytes_up_by_kind` and `bytes_down_by_kind` in metrics.jsonl and summary.json sum to
`bytes_up` and `bytes_down`. Up is what the server's transport received (MQTT payloads,
chunk headers included; the same bytes the devices' publishes counted). Down counts one
copy per device a message is for: the round start once per participant, the stop once per
ready device; the retained server presence is not counted (the broker hands it to however
many clients subscribe).
"""

from __future__ import annotations

from typing import Any

BYTE_KINDS = ("smashed", "grad", "weights", "weights_fallback", "bundle", "control")
# message kind -> what it carries; every other kind (join, presence, error, stop, the
# weights request, a payload that did not decode) is control. weights_fallback: the weights
# a device sends when its replay log did not replay (--device-sync replay)
_CARRIES = {"smashed": "smashed", "grad": "grad", "update": "weights", "round": "weights",
            "weights_reply": "weights_fallback", "bundle": "bundle"}


def byte_kind(kind: str | None) -> str:
    return _CARRIES.get(kind or "", "control")


class Traffic:
    """Running byte totals of one run, by direction and by what the bytes carry."""

    def __init__(self) -> None:
        self.up = dict.fromkeys(BYTE_KINDS, 0)
        self.down = dict.fromkeys(BYTE_KINDS, 0)

    def add_up(self, kind: str | None, n: int) -> None:
        self.up[byte_kind(kind)] += n

    def add_down(self, kind: str | None, n: int) -> None:
        self.down[byte_kind(kind)] += n

    @property
    def bytes_up(self) -> int:
        return sum(self.up.values())

    @property
    def bytes_down(self) -> int:
        return sum(self.down.values())

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"up": dict(self.up), "down": dict(self.down)}

    def since(self, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {d: {k: v - before[d][k] for k, v in now.items()}
                for d, now in self.snapshot().items()}

    def restore(self, counters: dict[str, Any]) -> None:
        """From a checkpoint's counters (`counters()`)."""
        self.up.update({k: int(counters["bytes_up_by_kind"].get(k, 0)) for k in BYTE_KINDS})
        self.down.update({k: int(counters["bytes_down_by_kind"].get(k, 0)) for k in BYTE_KINDS})

    def counters(self) -> dict[str, Any]:
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "bytes_up_by_kind": dict(self.up), "bytes_down_by_kind": dict(self.down)}
