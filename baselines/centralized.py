"""The centralized reference of the accuracy bench: the federation's network trained by torch.

``centralized`` is the reference every split algorithm is compared with: the same network
(same zoo model, same seeded initialisation) trained in this process by torch on the union
of the devices' training data, for as many samples as the federation's devices process
(participants x rounds x local steps x batch size), with the server's optimizer and lr. It
does not depend on the partition, so one run per (data set, seed) serves both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CENTRALIZED = "centralized"  # a reference, not a federation: see the module docstring


@dataclass(frozen=True)
class CentralizedSpec:
    """One centralized torch training job, as a federation's run options describe it."""

    dataset: str
    data_dir: str | None
    seed: int
    model: str | None  # None: zoo.default_model of the data set
    cut: str | None  # the split does not change the network; recorded for the report
    steps: int
    steps_per_round: int  # evaluate after as many samples as one federated round processes
    batch_size: int
    optimizer: str
    lr: float
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)


def centralized_spec(run_argv: Sequence[str]) -> CentralizedSpec:
    """The centralized twin of `heron run RUN_ARGV`: same data, model, initialisation seed and
    batch size, as many samples as its devices process, the server's optimizer and lr."""
    from heron.cli import build_parser
    from heron.cli.options import dataset_options, model_options

    args = build_parser().parse_args(["run", *run_argv])
    participants = args.per_round or args.devices
    return CentralizedSpec(
        dataset=args.dataset, data_dir=args.data_dir, seed=args.seed, model=args.model,
        cut=args.cut, steps=participants * args.rounds * args.local_steps,
        steps_per_round=participants * args.local_steps, batch_size=args.batch_size,
        optimizer=args.server_optimizer, lr=args.server_lr,
        dataset_options=dataset_options(args), model_options=model_options(args))


def train_centralized(spec: CentralizedSpec) -> dict[str, Any]:
    """Train the whole network by backprop on the whole training split, epoch-shuffled, and
    evaluate it on the test split after every round's worth of samples."""
    from torch import nn

    from exporter.zoo import build_split, default_model
    from heron_data.datasets import load_dataset
    from server.trainer import ServerTrainer, evaluate

    t0 = time.monotonic()
    ds = load_dataset(spec.dataset, spec.data_dir, seed=spec.seed, **spec.dataset_options)
    model = spec.model or default_model(ds.input_shape, ds.input_dtype)
    split = build_split(model, ds.input_shape, ds.num_classes, cut=spec.cut, seed=spec.seed,
                        **spec.model_options)
    # the server's own trainer, fed raw inputs: the same optimizer, lr and step
    trainer = ServerTrainer(nn.Sequential(split.client, split.server), optimizer=spec.optimizer,
                            lr=spec.lr, smashed_shape=ds.input_shape, num_classes=ds.num_classes)
    rng = np.random.default_rng(spec.seed)
    n = len(ds.y_train)
    batch = min(spec.batch_size, n)
    order, pos = rng.permutation(n), 0
    accuracies = []
    for step in range(1, spec.steps + 1):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch]
        pos += batch
        trainer.train_step(ds.x_train[idx], ds.y_train[idx])
        if step % spec.steps_per_round == 0 or step == spec.steps:
            accuracies.append(evaluate(split.client, split.server, ds.x_test, ds.y_test).accuracy)
    return {
        "final_test_accuracy": accuracies[-1],
        "test_accuracy_per_round": accuracies,
        "bytes_per_round": None, "bytes_total": None,  # no federation: nothing communicated
        "device_peak_rss_mb": None, "device_step_ms_median": None,
        "wall_seconds": round(time.monotonic() - t0, 3),
        "model": model, "cut": split.cut,
        "samples": spec.steps * batch, "train_samples": n,
    }
