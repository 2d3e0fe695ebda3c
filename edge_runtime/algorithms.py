"""The one registry of algorithms a federation can run, and what differs between them.

Every list of algorithm names (CLI choices, config validation, the device kinds, the
benchmark rows) and every check that depends on an algorithm reads this module: code
elsewhere asks an `Algorithm` for a property instead of comparing its name. The behaviour
of each family lives in one module per side: the server's in `server/strategies/` (one
module per family), the ONNX Runtime device's in `edge_runtime.runtime.train_round` (which
runs `device_update` "zo", "tail" or nothing), the torch device's in `devices/torch_device.py`.

Adding an algorithm of an existing family is one entry in `ALGORITHMS` (and one line in
`server.strategies.STRATEGIES`); a new family is one new server strategy module besides.

Pure Python, no numpy, torch or onnxruntime: the device and the wire types import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["aux-loss", "splitfed", "fedavg"]
Runtime = Literal["onnxruntime", "torch"]
# zo: forward-only estimates over all device weights; tail: the exact gradient of the aux
# loss w.r.t. the last device map + aux head from a gradient graph the exporter traced
# (ONNX Runtime still, no autograd on the device); backprop: torch on the device.
DeviceUpdate = Literal["zo", "tail", "backprop"]
Part = Literal["client", "aux", "server"]

# The device learning-rate default, by the class of device optimizer. ZO: measured on digits
# (BENCHMARKS.md), 1e-2 loses 4-6 points to frozen; first-order: the torch baselines' usual;
# tail: the Adam rate of the server-fixed screen whose ffnout-last1 backprop gained +2.75.
DEVICE_LR = {"zo": 3e-4, "first-order": 1e-3, "tail": 3e-4}


@dataclass(frozen=True)
class Algorithm:
    """What one algorithm is: everything the code that is not its strategy may ask."""

    name: str
    family: Family
    runtime: Runtime  # which device runs it: `heron device` or `heron device --torch`
    device_update: DeviceUpdate | None  # how the device trains; None: not at all (frozen)
    trained_parts: tuple[Part, ...]  # the model parts the device trains (the weights it owns)
    aux_loss: bool  # the device's loss goes through the aux head
    waits_for_gradient: bool  # each step uploads and waits for the cut-layer gradient
    ships_server_part: bool  # the global weights include the server part (the whole model)
    server_copy_per_device: bool  # the server trains one copy per device, averaged at round end
    uploads_smashed: bool  # the device sends smashed data during the round
    sends_weights: bool  # the round-end update carries the device's weights (else none)
    summary: str  # one line for help texts

    @property
    def lr_class(self) -> str:
        """The device learning-rate default class: "zo", "tail" or "first-order"."""
        if self.device_update == "tail":
            return "tail"
        return "first-order" if self.device_update == "backprop" else "zo"

    @property
    def needs_tail_graph(self) -> bool:
        """The bundle must carry the tail-gradient graph (and the tail in its weights)."""
        return self.device_update == "tail"

    @property
    def default_device_lr(self) -> float:
        return DEVICE_LR[self.lr_class]


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm(
        "heron", "aux-loss", "onnxruntime", "zo", ("client", "aux"), aux_loss=True,
        waits_for_gradient=False, ships_server_part=False, server_copy_per_device=False,
        uploads_smashed=True, sends_weights=True,
        summary="devices train client+aux by ZO (ONNX Runtime)"),
    Algorithm(
        "heron-tail", "aux-loss", "onnxruntime", "tail", ("client", "aux"), aux_loss=True,
        waits_for_gradient=False, ships_server_part=False, server_copy_per_device=False,
        uploads_smashed=True, sends_weights=True,
        summary="devices train the last device map + aux by its exact gradient (ONNX "
                "Runtime gradient graph)"),
    Algorithm(
        "cse-fsl", "aux-loss", "torch", "backprop", ("client", "aux"), aux_loss=True,
        waits_for_gradient=False, ships_server_part=False, server_copy_per_device=False,
        uploads_smashed=True, sends_weights=True,
        summary="client+aux by backprop"),
    Algorithm(
        "sflv1", "splitfed", "torch", "backprop", ("client",), aux_loss=False,
        waits_for_gradient=True, ships_server_part=False, server_copy_per_device=True,
        uploads_smashed=True, sends_weights=True,
        summary="SplitFed V1: per-step server gradient, one server copy per device"),
    Algorithm(
        "sflv2", "splitfed", "torch", "backprop", ("client",), aux_loss=False,
        waits_for_gradient=True, ships_server_part=False, server_copy_per_device=False,
        uploads_smashed=True, sends_weights=True,
        summary="SplitFed V2: per-step server gradient, one server model"),
    Algorithm(
        "fedavg", "fedavg", "torch", "backprop", ("client", "server"), aux_loss=False,
        waits_for_gradient=False, ships_server_part=True, server_copy_per_device=False,
        uploads_smashed=False, sends_weights=True,
        summary="the whole model trained on the device"),
    Algorithm(
        "frozen", "aux-loss", "onnxruntime", None, (), aux_loss=True,
        waits_for_gradient=False, ships_server_part=False, server_copy_per_device=False,
        uploads_smashed=True, sends_weights=False,
        summary="devices never update, they only send smashed data"),
)}


def algorithm(name: str, registry: dict[str, Algorithm] | None = None) -> Algorithm:
    """The registered algorithm `name`; ValueError naming the choices otherwise."""
    reg = ALGORITHMS if registry is None else registry
    found = reg.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown algorithm {name!r}; help: choose one of {', '.join(reg)}")
    return found


def names(registry: dict[str, Algorithm] | None = None, **props: object) -> tuple[str, ...]:
    """The names of the algorithms whose properties equal `props`, in registry order:
    `names(runtime="torch")`."""
    reg = ALGORITHMS if registry is None else registry
    return tuple(n for n, a in reg.items()
                 if all(getattr(a, k) == v for k, v in props.items()))


# Derived lists, for messages and defaults (never a second definition).
ONNX_ALGORITHMS = names(runtime="onnxruntime")  # `heron device` runs these
TORCH_ALGORITHMS = names(runtime="torch")  # `heron device --torch` runs these
AUX_ALGORITHMS = names(aux_loss=True)  # a device loss through the aux head
