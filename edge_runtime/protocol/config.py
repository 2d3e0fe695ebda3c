"""The training config every device receives (`RoundStart.config`, the server's presence)
and the one default of each of its settings.

Strict as well as typed: a config arrives over the network, and one with an unknown key, a
wrong type or a value out of range fails here, not deep in training. What each setting
means to an algorithm is up to the code that runs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# TrainConfig.algorithm and JoinProfile.algorithms carry the registry's names
from edge_runtime.algorithms import ALGORITHMS, DEVICE_LR, names
from edge_runtime.protocol.smashed_codec import CODECS, DEFAULT_CODEC, WIRE_DEFAULT

SCHEMES = ("forward", "central")
DISTRIBUTIONS = ("gaussian", "sphere")
OPTIMIZERS = ("sgd", "adam")
PERTURBS = ("full", "block")
# weights: a round's update carries the device's weights; replay: its (seed, projected
# gradient) log and a hash of its weights, which the server replays (edge_runtime.replay)
DEVICE_SYNCS = ("weights", "replay")
REPLAY_ALGORITHMS = names(device_update="zo")  # a log describes only a ZO device's round



@dataclass(frozen=True)
class ZOConfig:
    mu: float = 1e-3  # smoothing: perturbation size
    q: int = 1  # directions per step
    scheme: str = "forward"  # forward: [l(θ+μu) - l(θ)]/μ; central: [l(θ+μu) - l(θ-μu)]/2μ
    distribution: str = "gaussian"  # gaussian z ~ N(0, I); sphere u = z/|z| (scaled by d)
    perturb: str = "full"  # full: directions over all of θ; block: over one block each

    def __post_init__(self) -> None:
        if not (self.mu > 0 and np.isfinite(self.mu)):
            raise ValueError(f"mu must be a positive number, got {self.mu}")
        if self.q < 1:
            raise ValueError(f"q (directions per step) must be >= 1, got {self.q}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, "
                             f"got {self.distribution!r}")
        if self.perturb not in PERTURBS:
            raise ValueError(f"perturb must be one of {PERTURBS}, got {self.perturb!r}")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"
    lr: float = DEVICE_LR["zo"]  # the registry's, by how the device trains
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive, got {self.lr}")


@dataclass(frozen=True)
class TrainConfig:
    """What the server tells every device to do in a round (strict: unknown keys fail)."""

    algorithm: str = "heron"  # heron: ZO-train client+aux; others: baselines (ALGORITHMS)
    local_steps: int = 40  # h: ZO steps per round
    upload_every: int = 2  # k: smashed data every k steps
    batch_size: int = 32
    seed: int = 0
    smashed_codec: str = DEFAULT_CODEC  # how devices code smashed data (smashed_codec.CODECS)
    zo: ZOConfig = field(default_factory=ZOConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    device_sync: str = "weights"  # DEVICE_SYNCS: what a round's update carries

    def __post_init__(self) -> None:
        for name, (lo, hi) in _INT_BOUNDS.items():
            _check_int(name, getattr(self, name), lo, hi)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; help: choose one of "
                             f"{', '.join(ALGORITHMS)}")
        if self.device_sync not in DEVICE_SYNCS:
            raise ValueError(f"device_sync must be one of {DEVICE_SYNCS}, got "
                             f"{self.device_sync!r}")
        if self.device_sync == "replay" and self.algorithm not in REPLAY_ALGORITHMS:
            raise ValueError(f"--device-sync replay needs a device that trains by ZO "
                             f"({', '.join(REPLAY_ALGORITHMS)}), whose round a (seed, "
                             f"projected gradient) log describes; {self.algorithm} does not: "
                             "help: --device-sync weights")
        if self.smashed_codec not in CODECS:
            raise ValueError(f"unknown smashed codec {self.smashed_codec!r}; help: choose one "
                             f"of {', '.join(CODECS)}")
        if not isinstance(self.zo, ZOConfig) or not isinstance(self.optimizer, OptimizerConfig):
            raise ValueError("zo and optimizer must be a ZOConfig and an OptimizerConfig")
        _check_int("zo.q", self.zo.q, 1, 4096)
        _check_real("zo.mu", self.zo.mu, 0.0, 1e3, open_low=True)
        _check_real("optimizer.lr", self.optimizer.lr, 0.0, 1e3, open_low=True)
        _check_real("optimizer.beta1", self.optimizer.beta1, 0.0, 1.0, open_high=True)
        _check_real("optimizer.beta2", self.optimizer.beta2, 0.0, 1.0, open_high=True)
        _check_real("optimizer.eps", self.optimizer.eps, 0.0, 1.0, open_low=True)
        _check_real("optimizer.weight_decay", self.optimizer.weight_decay, 0.0, 1e3)

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        if self.zo.perturb == "full":  # the default stays off the wire: a config without
            del obj["zo"]["perturb"]  # `perturb` means full
        if self.device_sync == "weights":  # likewise
            del obj["device_sync"]
        return obj

    @staticmethod
    def from_json(obj: dict[str, Any]) -> TrainConfig:
        """The config a server sent (strict: unknown keys, wrong types and out-of-range
        values raise ValueError or TypeError)."""
        if not isinstance(obj, dict):
            raise ValueError(f"a training config is an object, not {type(obj).__name__}")
        known = set(TrainConfig.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}")
        fields = dict(obj)
        fields.setdefault("smashed_codec", WIRE_DEFAULT)  # not the local default: the sender's
        for name, cls in (("zo", ZOConfig), ("optimizer", OptimizerConfig)):
            if name in fields:
                if not isinstance(fields[name], dict):
                    raise ValueError(f"{name} must be an object, got {fields[name]!r}")
                fields[name] = cls(**fields[name])
        return TrainConfig(**fields)


_INT_BOUNDS = {"local_steps": (1, 1_000_000), "upload_every": (1, 1_000_000),
               "batch_size": (1, 1 << 20), "seed": (0, 2**63 - 1)}


def _check_int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")


def _check_real(name: str, v: Any, lo: float, hi: float, *, open_low: bool = False,
                open_high: bool = False) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) \
        and math.isfinite(v) and lo <= v <= hi and not (open_low and v == lo) \
        and not (open_high and v == hi)
    if not ok:
        raise ValueError(f"{name} must be a finite number in {'(' if open_low else '['}{lo:g}, "
                         f"{hi:g}{')' if open_high else ']'}, got {v!r}")
