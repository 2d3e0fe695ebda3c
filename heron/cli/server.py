"""`heron server`: the options a federation's server takes (shared with `heron run`), the
checks made before anything starts, and the server command itself."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edge_runtime.algorithms import ALGORITHMS, AUX_ALGORITHMS, DEVICE_LR, algorithm
from edge_runtime.protocol.config import (
    DEVICE_SYNCS,
    DISTRIBUTIONS,
    OPTIMIZERS,
    PERTURBS,
    SCHEMES,
    TrainConfig,
)
from edge_runtime.protocol.smashed_codec import CODECS
from heron.cli.config import add_config_option, write_config
from heron.cli.options import (
    add_broker,
    add_data,
    add_http,
    add_model_options,
    dataset_options,
    model_options,
    mqtt_credentials,
    need_server_extra,
    nonneg_int,
    positive_float,
    positive_int,
    setup_logging,
    signame,
    takes_text,
    trim_fraction,
    usage,
)


def add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("federation")
    g.add_argument("--devices", type=positive_int, default=3, help="devices in the federation (3)")
    g.add_argument("--rounds", type=positive_int, default=20, help="rounds R (20)")
    g.add_argument("--per-round", type=positive_int, default=None,
                   help="devices picked per round (default: all)")
    g.add_argument("--model", default=None,
                   help="cnn, fedcnn, resnet18 (images) or minilm (text: pretrained "
                   "all-MiniLM-L6-v2 with LoRA, for --dataset sst2/tsv) (default: fedcnn, the "
                   "FedAvg paper's CNN, for 1x28x28 images such as mnist; minilm for text; "
                   "cnn otherwise)")
    g.add_argument("--algorithm", default=TrainConfig.algorithm, choices=tuple(ALGORITHMS),
                   help="heron: devices train client+aux by ZO (ONNX Runtime). Baselines: "
                   "cse-fsl (client+aux by backprop), sflv1/sflv2 (SplitFed: per-step "
                   "server gradient; V1 one server copy per device, averaged; V2 one server "
                   "model), fedavg (whole model on the device), frozen (devices never "
                   "update). The first four run on torch devices (`heron device --torch`); "
                   "`heron run` starts the right kind (heron)")
    g.add_argument("--cut", default=None,
                   help="cut layer (cnn, fedcnn: conv1|conv2, default conv1; resnet18: "
                   "stem|layer1|layer2, default layer1; minilm: layer1..layer5, default layer3)")
    g.add_argument("--weighting", default="samples", choices=("samples", "uniform"),
                   help="how device weights are averaged (samples)")
    g.add_argument("--round-timeout", type=positive_float, default=600.0,
                   help="seconds before a round closes with the updates it has (600)")
    g.add_argument("--join-timeout", type=positive_float, default=300.0,
                   help="seconds to wait for --devices devices to join (300)")
    g.add_argument("--min-devices", type=positive_int, default=None,
                   help="close a round as soon as this many updates arrived, and start once "
                   "this many devices are ready (default: all participants)")
    g.add_argument("--max-update-norm", type=positive_float, default=None,
                   help="reject device updates farther than this (L2) from the global weights")
    g.add_argument("--clip-update-norm", type=positive_float, default=None,
                   help="pull device updates farther than this (L2) from the global weights "
                   "back to this distance before aggregating (default: off)")
    g.add_argument("--aggregate", default="mean", choices=("mean", "median", "trimmed-mean"),
                   help="mean (FedAvg, by --weighting), or coordinate-wise median or trimmed "
                   "mean, which bound what one device can do to the average and ignore "
                   "sample counts (mean)")
    g.add_argument("--trim", type=trim_fraction, default=0.2,
                   help="trimmed-mean: fraction of the updates dropped at each end of every "
                   "coordinate, rounded down (0.2: one of 5; with 3 devices it takes >= 0.34)")
    g.add_argument("--quarantine-after", type=nonneg_int, default=10,
                   help="rejected messages after which a device is quarantined for the run: "
                   "its messages dropped, no more rounds (0: never) (10)")
    g.add_argument("--aux-from-server", action="store_true",
                   help="start each round's aux head as a copy of the server's first layers "
                   "and classifier (every aux tensor with a same-named server tensor; minilm), "
                   "instead of the devices' average")
    e = p.add_argument_group("evaluation and logging")
    e.add_argument("--eval-every", type=positive_int, default=1,
                   help="evaluate the model every N rounds, and always after the last; the "
                   "others have null test accuracy in metrics.jsonl (1)")
    e.add_argument("--eval-limit", type=positive_int, default=None,
                   help="evaluate on this many test examples (a seeded subset, the same each "
                   "round) while training; the last round uses the full test set (default: all)")
    e.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="write per-round scalars (accuracy, losses, bytes, per-device memory "
                   "and step time, time split) for TensorBoard to DIR (needs tensorboard)")
    z = p.add_argument_group("device (zeroth-order) training")
    train = TrainConfig()  # every default below is the config's
    z.add_argument("--local-steps", type=positive_int, default=train.local_steps,
                   help="h: ZO steps per round (%(default)s)")
    z.add_argument("--upload-every", type=positive_int, default=train.upload_every,
                   help="k: upload smashed data every k steps (%(default)s)")
    z.add_argument("--smashed-codec", default=train.smashed_codec, choices=CODECS,
                   help="how devices code smashed data: fp32, fp16 (half the bytes) or int8 "
                   "(a quarter; per-channel scale and offset); BENCHMARKS.md (%(default)s)")
    z.add_argument("--batch-size", type=positive_int, default=train.batch_size,
                   help="device batch size (%(default)s)")
    z.add_argument("--mu", type=positive_float, default=train.zo.mu,
                   help="ZO smoothing mu (%(default)g)")
    z.add_argument("--q", type=positive_int, default=train.zo.q,
                   help="ZO directions per step (%(default)s)")
    z.add_argument("--scheme", default=train.zo.scheme, choices=SCHEMES,
                   help="finite difference (%(default)s)")
    z.add_argument("--distribution", default=train.zo.distribution, choices=DISTRIBUTIONS,
                   help="direction distribution (%(default)s)")
    z.add_argument("--zo-perturb", default=train.zo.perturb, choices=PERTURBS,
                   help="full: each direction perturbs all device weights (the paper); block: "
                   "one block per direction, re-run from that block's cached input "
                   "(beyond the paper, cheaper steps; BENCHMARKS.md) (%(default)s)")
    z.add_argument("--device-sync", default=train.device_sync, choices=DEVICE_SYNCS,
                   help="what a device uploads at round end: weights, or replay: its (seed, "
                   "projected gradient) log and a hash of its weights, which the server "
                   "replays and checks; ZO devices (heron) only (%(default)s)")
    z.add_argument("--device-optimizer", default=train.optimizer.name, choices=OPTIMIZERS,
                   help="optimizer fed with the ZO estimate (%(default)s)")
    z.add_argument("--device-lr", type=positive_float, default=None,
                   help=f"device learning rate (heron {DEVICE_LR['zo']:g}, the paper's order of "
                   "magnitude: larger rates turn Adam on ZO estimates into a random walk that "
                   f"hurts accuracy; first-order baselines {DEVICE_LR['first-order']:g})")
    s = p.add_argument_group("server (first-order) training")
    s.add_argument("--server-optimizer", default="adam", choices=("adam", "sgd"))
    s.add_argument("--server-lr", type=positive_float, default=1e-3,
                   help="server learning rate (1e-3)")
    s.add_argument("--server-threads", type=positive_int, default=None,
                   help="torch threads on the server")
    s.add_argument("--deterministic", action="store_true",
                   help="bit-for-bit repeatable on this machine: a round's smashed batches "
                   "trained at its end in (step, device) order, torch's deterministic "
                   "kernels; not with sflv2 or --min-devices (README)")


def resolve_model(args: argparse.Namespace, command: str) -> str:
    """The zoo's model for the data set's input shape, when --model is not given."""
    from exporter.zoo import default_model
    from heron_data.datasets import DatasetError, load_dataset

    try:
        ds = load_dataset(args.dataset, args.data_dir, seed=args.seed, **dataset_options(args))
    except (DatasetError, ValueError) as exc:
        usage(command, str(exc))
    return default_model(ds.input_shape, ds.input_dtype)


def train_config(args: argparse.Namespace) -> Any:
    from edge_runtime.protocol import OptimizerConfig, ZOConfig

    return TrainConfig(
        algorithm=args.algorithm, local_steps=args.local_steps, upload_every=args.upload_every,
        batch_size=args.batch_size, seed=args.seed, smashed_codec=args.smashed_codec,
        zo=ZOConfig(mu=args.mu, q=args.q, scheme=args.scheme, distribution=args.distribution,
                    perturb=args.zo_perturb),
        optimizer=OptimizerConfig(name=args.device_optimizer, lr=args.device_lr or
                                  algorithm(args.algorithm).default_device_lr),
        device_sync=args.device_sync)



def need_tensorboard(args: argparse.Namespace, command: str) -> None:
    """--tensorboard without the package is a usage error before anything starts."""
    import importlib.util

    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        usage(command, "--tensorboard needs the tensorboard package; help: pip install "
              "tensorboard (in heron's server extra), or leave out --tensorboard")


SERVER_CONFIG = "server.toml"  # the server's resolved options, beside its results


def server_options(args: argparse.Namespace) -> Any:
    """The server's options from its flags (tests/heron/test_config.py checks that every
    ServerOptions field has exactly one flag and every flag a field)."""
    from server.options import ServerOptions
    from server.policy import Limits

    return ServerOptions(
        broker=args.broker, out=Path(args.out), dataset=args.dataset, data_dir=args.data_dir,
        model=args.model, cut=args.cut, devices=args.devices, rounds=args.rounds,
        per_round=args.per_round, train=train_config(args),
        dataset_options=dataset_options(args), model_options=model_options(args),
        server_optimizer=args.server_optimizer, server_lr=args.server_lr,
        weighting=args.weighting, seed=args.seed, prefix=args.prefix,
        threads=args.server_threads, join_timeout=args.join_timeout,
        round_timeout=args.round_timeout, min_devices=args.min_devices,
        max_update_norm=args.max_update_norm, clip_update_norm=args.clip_update_norm,
        aggregate=args.aggregate, trim=args.trim,
        limits=Limits(quarantine_after=args.quarantine_after), resume=args.resume,
        aux_from_server=args.aux_from_server, deterministic=args.deterministic,
        eval_every=args.eval_every, eval_limit=args.eval_limit,
        tensorboard=Path(args.tensorboard) if args.tensorboard else None,
        credentials=mqtt_credentials(args), http=args.http, http_token=args.http_token)


def cmd_server(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_federation(args)
    need_server_extra()
    check_page(args)
    need_tensorboard(args, "server")
    args.model = args.model or resolve_model(args, "server")
    check_model(args)
    if args.resume:
        check_resume(args, out)
    check_writable(args.command, out)
    setup_logging(args.verbose)
    from edge_runtime.transport import BrokerError
    from heron.lifecycle import Stopped, StopSignals, exit_code
    from heron_data.datasets import DatasetError
    from server.loop import Server
    from server.records import WriteError
    from server.setup import build_run, mqtt_transport

    try:
        write_config(out / SERVER_CONFIG, args, "server")
    except WriteError as exc:
        usage("server", str(exc))
    server: Server | None = None

    def on_stop(signum: int) -> None:
        if server is None:  # still loading and exporting: nothing to keep, stop at once
            raise Stopped(signum)
        server.stop.set()  # the loop stops between messages, summary matching checkpoint

    with StopSignals(on_stop) as signals:
        try:
            opts = server_options(args)
            run = build_run(opts)
            server = Server(run, mqtt_transport(opts, run.run_id))
            page = start_page(opts, server.view)
            try:
                summary = server.run()
            finally:
                if page is not None:
                    page.stop()
        except Stopped as exc:
            print(f"heron server: {exc} before the first round", file=sys.stderr, flush=True)
            return exit_code(exc.signum)
        except WriteError as exc:  # before BrokerError: both are OSErrors
            print(f"heron server: {exc}", file=sys.stderr, flush=True)
            return 1
        except (DatasetError, BrokerError, TimeoutError, ValueError, OSError) as exc:
            print(f"heron server: {exc}", file=sys.stderr)
            return 2
    if summary.get("interrupted"):
        assert signals.signum is not None
        print(f"heron server: stopped by {signame(signals.signum)} after round "
              f"{summary['completed_rounds']}/{summary['rounds']}; every completed round is in "
              f"{out / 'checkpoint.pt'}; continue with `heron server --resume`",
              file=sys.stderr, flush=True)
        return exit_code(signals.signum)
    print(f"final test accuracy {summary['final_test_accuracy']:.4f} after "
          f"{summary['rounds']} rounds in {summary['wall_seconds']:.1f} s; "
          f"files in {out.resolve()}", flush=True)
    return 0



def check_page(args: argparse.Namespace) -> None:
    """--http's address (flag or config file) and aiohttp, before the model loads."""
    if args.http is None:
        return
    from server.fleet_view import split_address

    try:
        split_address(args.http)
    except ValueError as exc:
        usage(args.command, str(exc))
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        usage(args.command, "--http needs aiohttp; help: pip install 'heron-sfl[server]' (or "
              "aiohttp)")


def start_page(opts: Any, view: Any) -> Any:
    """The live fleet page when --http is given (None otherwise), listening before round 1."""
    if not opts.http:
        return None
    from server.fleet_page import FleetPage

    page = FleetPage(view, opts.http, opts.http_token)
    url = page.start()  # OSError (the port is taken): exit 2 like other bad options
    if page.host not in ("127.0.0.1", "::1", "localhost") and not opts.http_token:
        print(f"heron server: the fleet page at {url} is open to the network without "
              "--http-token", file=sys.stderr, flush=True)
    print(f"fleet page: {url}" + (" (bearer token required)" if opts.http_token else ""),
          flush=True)
    return page


# -- checks made before anything starts (exit 2, nothing written) ---------------------------
def check_federation(args: argparse.Namespace) -> None:
    """Options that argparse's types cannot judge alone: how they go together."""
    cmd = args.command
    if args.per_round is not None and args.per_round > args.devices:
        usage(cmd, f"--per-round {args.per_round} is more than --devices {args.devices}")
    if args.min_devices is not None and args.min_devices > args.devices:
        usage(cmd, f"--min-devices {args.min_devices} is more than --devices {args.devices}")
    try:
        train_config(args)
    except (ValueError, TypeError) as exc:
        usage(cmd, str(exc))
    from heron_data.datasets import DATASETS, TEXT_DATASETS

    if args.dataset not in DATASETS:
        usage(cmd, f"unknown --dataset {args.dataset!r}; help: choose one of "
              f"{', '.join(DATASETS)}")
    if args.aux_from_server and not algorithm(args.algorithm).aux_loss:
        usage(cmd, f"--aux-from-server applies to {', '.join(AUX_ALGORITHMS)} (the "
              f"algorithms that train an aux head), not {args.algorithm}")
    from server.policy import deterministic_conflict

    why = deterministic_conflict(args.algorithm, args.min_devices)
    if args.deterministic and why:
        usage(cmd, why)
    model_options(args)
    text = takes_text(args)
    if text != (args.dataset in TEXT_DATASETS):
        usage(cmd, f"--model {args.model} takes {'text' if text else 'images'} but --dataset "
              f"{args.dataset} holds {'images' if text else 'text'}; help: --model minilm with "
              f"--dataset {' or '.join(TEXT_DATASETS)}, cnn, fedcnn or resnet18 with image "
              "datasets")


def check_model(args: argparse.Namespace) -> None:
    """Model and cut names (needs the exporter, so torch: after `need_server_extra`)."""
    from exporter.zoo import MODELS

    if args.model not in MODELS:
        usage(args.command, f"unknown --model {args.model!r}; help: choose one of "
              f"{', '.join(MODELS)}")
    if args.cut is not None and args.cut not in MODELS[args.model]:
        usage(args.command, f"unknown --cut {args.cut!r} for --model {args.model}; help: "
              f"choose one of {', '.join(MODELS[args.model])}")


def check_resume(args: argparse.Namespace, out: Path) -> None:
    """A checkpoint to resume must be readable and written by a run with these options."""
    from server.records import CheckpointError, check_checkpoint_matches, load_checkpoint

    path = out / "checkpoint.pt"
    if not path.exists():
        return  # killed before its first round: the server starts at round 1 and says so
    try:
        ckpt = load_checkpoint(path)
        check_checkpoint_matches(ckpt, path, model=args.model, cut=args.cut,
                                 algorithm=args.algorithm)
    except CheckpointError as exc:
        usage(args.command, f"cannot resume: {exc}")


def check_writable(cmd: str, out: Path) -> None:
    """The run directory must take files: found now, not when the first round ends."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        usage(cmd, f"cannot write to --out {out}: {exc.strerror or exc}; help: choose a "
              "directory you can write to, on a disk with free space")


def add_server_parser(sub: Any) -> None:
    srv = sub.add_parser("server", help="the server: waits for devices, runs the rounds")
    # --broker and --out are required, here or in --config (heron.cli.parse_args checks)
    add_broker(srv, required=False, default="")
    add_data(srv)
    add_training(srv)
    add_model_options(srv)
    add_http(srv)
    srv.add_argument("--out", help="run directory")
    srv.add_argument("--resume", action="store_true",
                     help="continue the run in --out after its last completed round")
    add_config_option(srv)
    srv.set_defaults(func=cmd_server)
