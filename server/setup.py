"""Building a run before any networking: data, the exported bundle, the server trainer,
the global weights, and what a resumed run starts from. `server.loop.Server` receives the
result (`Run`) and a transport, so the loop can run over MQTT or in-process alike.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_runtime.algorithms import AUX_ALGORITHMS, algorithm
from edge_runtime.bundle import GRAPH, Bundle, read_bundle_files
from edge_runtime.bundle import bundle_from_files as verify_files
from edge_runtime.manifest import Manifest
from edge_runtime.protocol import Presence, topics
from edge_runtime.transport import Endpoint, Transport
from exporter.export import aux_from_server, export_bundle
from exporter.tail_grad import mark_tail_trainable
from exporter.zoo import SplitModel, build_split
from heron_data.datasets import Dataset, load_dataset
from server.aggregate import AGGREGATES, check_trim
from server.options import ServerOptions
from server.policy import deterministic_conflict
from server.records import load_checkpoint
from server.strategies import ServerStrategy, server_strategy
from server.trainer import ServerTrainer

log = logging.getLogger("heron.server")


@dataclass
class Run:
    """Everything the loop needs that does not come over the network."""

    opts: ServerOptions
    run_id: str
    data: Dataset
    split: SplitModel
    manifest: Manifest
    bundle_files: dict[str, bytes]
    bundle: Bundle
    bundle_sha: str
    trainer: ServerTrainer
    strategy: ServerStrategy  # what this run's algorithm does on the server
    theta: np.ndarray  # the global device weights the first round sends
    aux_copied: list[str]  # --aux-from-server: the aux tensors copied from the server
    checkpoint: dict[str, Any] | None = None  # what --resume continues from


def check_options(opts: ServerOptions) -> None:
    """Options that cannot work together: ValueError naming the flag, before any work."""
    if opts.rounds < 1 or opts.devices < 1:
        raise ValueError(f"--rounds and --devices must be >= 1, got {opts.rounds} and "
                         f"{opts.devices}")
    if opts.min_devices is not None and opts.min_devices < 1:
        raise ValueError(f"--min-devices must be >= 1, got {opts.min_devices}")
    if opts.aggregate not in AGGREGATES:
        raise ValueError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got "
                         f"{opts.aggregate!r}")
    check_trim(opts.trim)
    for flag, bound in (("--max-update-norm", opts.max_update_norm),
                        ("--clip-update-norm", opts.clip_update_norm)):
        if bound is not None and not bound > 0:
            raise ValueError(f"{flag} must be > 0, got {bound}")
    why = deterministic_conflict(opts.train.algorithm, opts.min_devices)
    if opts.deterministic and why:
        raise ValueError(why)


def make_deterministic(opts: ServerOptions) -> None:
    """Process-wide torch settings under --deterministic (the loop fixes the order)."""
    torch.manual_seed(opts.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(opts.threads or torch.get_num_threads())


def build_run(opts: ServerOptions) -> Run:
    """Load the data, build and export the split, make the trainer; with --resume, load
    OUT/checkpoint.pt into them. Raises ValueError (DatasetError is one) on bad input."""
    check_options(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.deterministic:
        make_deterministic(opts)
    data = load_dataset(opts.dataset, opts.data_dir, seed=opts.seed, **opts.dataset_options)
    split = build_split(opts.model, data.input_shape, data.num_classes, cut=opts.cut,
                        seed=opts.seed, **opts.model_options)
    opts.out.mkdir(parents=True, exist_ok=True)
    tail_batch = None
    if algorithm(opts.train.algorithm).needs_tail_graph:
        # the tail joins the device's weights (shipped, trained, aggregated) and the bundle
        # gets the graph of its gradient for the run's fixed batch
        mark_tail_trainable(split)
        tail_batch = opts.train.batch_size
    manifest = export_bundle(split, opts.out / "bundle", tail_batch=tail_batch)
    bundle_files = read_bundle_files(opts.out / "bundle")
    bundle = verify_files(bundle_files)
    trainer = ServerTrainer(split.server, optimizer=opts.server_optimizer, lr=opts.server_lr,
                            smashed_shape=manifest.smashed_shape,
                            num_classes=manifest.num_classes)
    strategy = server_strategy(opts.train.algorithm, trainer, split, manifest, opts.weighting,
                               deterministic=opts.deterministic)
    theta = strategy.initial_weights(bundle.weights.copy())
    aux_copied: list[str] = []
    if opts.aux_from_server:
        if not strategy.algorithm.aux_loss:
            raise ValueError(f"--aux-from-server applies to {', '.join(AUX_ALGORITHMS)} "
                             f"(the algorithms that train an aux head), not "
                             f"{opts.train.algorithm}")
        theta, aux_copied = aux_from_server(split.server, manifest, theta)
        if not aux_copied:
            raise ValueError(f"--aux-from-server: no aux parameter of {opts.model} has a "
                             "server parameter of the same name and shape to copy; help: "
                             "it works where the aux head is built like the server's first "
                             "layers (minilm)")
        log.info("aux head follows the server each round: %d tensors (%s)",
                 len(aux_copied), ", ".join(aux_copied))
    run = Run(opts, uuid.uuid4().hex[:12], data, split, manifest, bundle_files, bundle,
              manifest.files[GRAPH], trainer, strategy, theta, aux_copied)
    if opts.resume:
        _load_checkpoint(run)
    return run


def _load_checkpoint(run: Run) -> None:
    """The model state of the last completed round recorded in OUT/checkpoint.pt; the loop
    takes its records and counters (`Server._restore`)."""
    path = run.opts.out / "checkpoint.pt"
    if not path.exists():
        print(f"nothing to resume in {run.opts.out} (no checkpoint.pt): starting at round 1",
              flush=True)
        return
    try:
        ckpt = load_checkpoint(path)
    except Exception as exc:  # torch raises several types for a bad file
        raise ValueError(f"cannot read {path}: {exc}; help: start a new run with another "
                         "--out") from exc
    mine = run.manifest.to_json()
    theirs = ckpt["manifest"]
    for key in ("model", "cut", "num_params", "num_classes"):
        if mine[key] != theirs[key]:
            raise ValueError(
                f"{path} is for {key}={theirs[key]!r} but this server has {mine[key]!r}; "
                "help: resume with the options of the original run")
    weights = ckpt["device_weights"].numpy().astype(np.float32)
    if weights.shape != run.theta.shape:
        raise ValueError(f"{path} holds {weights.size} device weights, this "
                         f"{run.opts.train.algorithm} server needs {run.theta.size}; help: "
                         "resume with the --algorithm of the original run")
    run.theta = weights
    run.split.server.load_state_dict(ckpt["server_state"])
    run.trainer.optimizer.load_state_dict(ckpt["server_optimizer"])
    run.run_id = str(ckpt["run_id"])
    run.checkpoint = ckpt
    print(f"resuming run {run.run_id} after round {ckpt['round']} from {path}", flush=True)


def server_endpoint(prefix: str, run_id: str) -> Endpoint:
    """The server on the bus: every device's uplink and presence; an offline presence of
    this run as its will."""
    return Endpoint(f"heron-server-{prefix.replace('/', '_')}",
                    topics.server_subscriptions(prefix),
                    (topics.server_status(prefix),
                     Presence(run_id, -1, "server", state="offline")))


def mqtt_transport(opts: ServerOptions, run_id: str) -> Transport:
    """The server's MQTT connection, as `heron server` makes it."""
    from edge_runtime.transport.mqtt import MqttTransport

    ep = server_endpoint(opts.prefix, run_id)
    return MqttTransport(opts.broker, ep.client_id, ep.subscriptions, will=ep.will,
                         credentials=opts.credentials)
