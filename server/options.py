"""`ServerOptions`: everything a server run is told, one field per `heron server` flag.

Apart from the loop so that the CLI, `server.setup` and the tests can build options without
importing it (tests/heron/test_config.py checks the fields against the flags).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.protocol import TrainConfig, topics
from edge_runtime.transport import Credentials
from server.policy import Limits


@dataclass(frozen=True)
class ServerOptions:
    broker: str
    out: Path
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "cnn"
    cut: str | None = None
    devices: int = 3  # how many ready devices to wait for before round 1
    rounds: int = 20
    per_round: int | None = None  # devices picked per round (default: all ready)
    train: TrainConfig = field(default_factory=TrainConfig)
    server_optimizer: str = "adam"
    server_lr: float = 1e-3
    weighting: str = "samples"
    seed: int = 0
    prefix: str = topics.DEFAULT_PREFIX
    threads: int | None = None
    join_timeout: float = 300.0
    round_timeout: float = 600.0
    min_devices: int | None = None  # close a round once this many updates are in
    resume: bool = False  # continue from OUT/checkpoint.pt
    max_update_norm: float | None = None  # reject updates farther from the global weights
    clip_update_norm: float | None = None  # pull updates back to this distance (L2)
    aggregate: str = "mean"  # mean | median | trimmed-mean (server.aggregate)
    trim: float = 0.2  # trimmed-mean: fraction dropped at each end of every coordinate
    limits: Limits = field(default_factory=Limits)  # per-device limits (server.policy)
    max_weight_abs: float = 1e4  # larger weights are treated as a broken or hostile update
    aux_from_server: bool = False  # each round the aux head starts as the server's first layers
    credentials: Credentials | None = None
    # bit-for-bit repeatable on one machine: a round's smashed batches trained at its end in
    # (step, device) order, torch's deterministic kernels (server.setup.make_deterministic)
    deterministic: bool = False
    eval_every: int = 1  # evaluate every N rounds (server.evaluation), and after the last
    eval_limit: int | None = None  # on this many seeded test examples; the last round: all
    tensorboard: Path | None = None  # per-round scalars written here (server.tensorboard)
    dataset_options: dict[str, Any] = field(default_factory=dict)  # load_dataset keywords
    model_options: dict[str, Any] = field(default_factory=dict)  # build_split keywords
    http: str | None = None  # HOST:PORT of the live fleet page (server.fleet_page)
    http_token: str | None = None  # bearer token every route of the page wants
