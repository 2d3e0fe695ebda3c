"""`heron profile` (one device step, measured) and `heron bench` (the cost, accuracy, progress
and screen workloads)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_runtime.algorithms import ALGORITHMS
from edge_runtime.protocol.config import TrainConfig
from edge_runtime.protocol.smashed_codec import CODECS
from heron.cli.options import (
    need_server_extra,
    nonneg_int,
    positive_float,
    positive_int,
    unit_fraction,
    usage,
)


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
    need_server_extra()  # the parent exports the bundle and counts FLOPs with torch and onnx
    from baselines.profile import ProfileError, profile

    args.model = args.model or "resnet18"
    _text_profile_defaults(args)
    try:
        result = profile(args.algorithm, model=args.model, cut=args.cut,
                         batch=args.batch,
                         threads=args.threads, steps=args.steps, warmup=args.warmup,
                         input_shape=args.input_shape, num_classes=args.num_classes,
                         perturb=args.zo_perturb, q=args.q,
                         smashed_codec=args.smashed_codec)
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
            datasets=_csv(args.datasets), mnist_dir=args.mnist_dir, cifar_dir=args.cifar_dir,
            partitions=_csv(args.partitions), alpha=args.alpha,
            algorithms=_csv(args.algorithms), seeds=tuple(int(s) for s in _csv(args.seeds)),
            devices=_one_count(args.devices, 5), rounds=args.rounds or 20,
            local_steps=args.local_steps or 40,
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


def _one_count(text: str | None, default: int) -> int:
    """The accuracy workload's --devices: one count (the fleet's takes a list)."""
    if text is None:
        return default
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"heron bench: --devices: {exc}; help: a list like 10,100 is for "
                         "--workload fleet") from exc


def cmd_bench_fleet(args: argparse.Namespace) -> int:
    from baselines.fleet import FleetBenchError, FleetConfig, parse_devices, run_fleet

    try:
        cfg = FleetConfig(
            devices=parse_devices(args.devices or "10,100,300,1000"), rounds=args.rounds or 3,
            dataset=args.dataset, model=args.model or "cnn",
            local_steps=args.local_steps or 10, per_host=args.per_host,
            broker=args.fleet_broker, run_args=tuple(args.run_arg or ()))
        print(f"heron bench: fleet workload, {cfg.model} on {cfg.dataset}, devices "
              f"{','.join(map(str, cfg.devices))}, {cfg.rounds} rounds of {cfg.local_steps} "
              f"local steps, {cfg.broker} broker, up to {cfg.per_host} devices per process; "
              f"files in {Path(args.out).resolve()}", flush=True)
        report = run_fleet(args.out, cfg, command=" ".join(["heron", *sys.argv[1:]]),
                           progress=lambda line: print(line, flush=True))
    except (FleetBenchError, ValueError, OSError) as exc:
        raise SystemExit(f"heron bench: {exc}") from exc
    print((Path(args.out) / "fleet.md").read_text(), end="", flush=True)
    if report["plot"] is None:
        print("no fleet.png: matplotlib is missing or no size finished a round", flush=True)
    return 0 if report["first_failure"] is None else 1


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
                             fo_steps=args.fo_steps, act_rank=args.act_rank,
                             act_refresh=args.act_refresh)
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
            threads=args.threads or 1, eval_samples=args.eval_samples,
            act_batches=args.act_batches)
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
    need_server_extra()
    from baselines.bench import run_cost
    from baselines.profile import ProfileError

    if args.workload not in ("progress", "screen"):
        ignored = [name for name, default in args.server_fixed_options.items()
                   if getattr(args, name) != default]
        if ignored:
            flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
            usage("bench", f"--workload {args.workload} does not use {flags} (options of "
                  "the progress and screen workloads); help: to pass an option to every "
                  "`heron run` of the accuracy bench, use --run-arg=--OPTION")
    if args.workload == "accuracy":
        return cmd_bench_accuracy(args)
    if args.workload == "progress":
        return cmd_bench_progress(args)
    if args.workload == "fleet":
        return cmd_bench_fleet(args)
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




def add_bench_parsers(sub: Any) -> None:
    prof = sub.add_parser("profile", help="measure one device training step of an algorithm "
                          "in a fresh process; prints JSON")
    prof.add_argument("--algorithm", default="heron",
                      choices=tuple(ALGORITHMS),
                      help="the device step to measure (heron)")
    _add_profile_options(prof, steps=20)
    prof.add_argument("--zo-perturb", default="full", choices=("full", "block"),
                      help="heron's ZO perturbation: full (the paper) or block (full)")
    prof.add_argument("--q", type=positive_int, default=1,
                      help="heron's ZO directions per step, as `heron run --q` (1)")
    prof.add_argument("--smashed-codec", default=TrainConfig.smashed_codec, choices=CODECS,
                      help="how the device codes its smashed uploads, in the timed steps (on its "
                      "uplink thread, as `heron device`) "
                      f"and in the byte counts ({TrainConfig.smashed_codec})")
    prof.add_argument("--out", help="also write the JSON to this file")
    prof.set_defaults(func=cmd_profile)

    bench = sub.add_parser("bench", help="compare the algorithms; writes a markdown table, "
                           "JSON and plots into --out")
    bench.add_argument("--workload", default="cost", choices=("cost", "accuracy", "progress",
                                                           "screen", "fleet"),
                       help="cost: every algorithm's device step time, peak RSS, FLOPs and "
                       "bytes on one model (resnet18 by default); accuracy: every algorithm "
                       "federated over data sets, partitions and seeds (cnn by default); "
                       "progress: from a finished run, ZO vs first-order device steps with the "
                       "server held fixed (--from); screen: from a finished run, backprop "
                       "restricted to candidate sets of device weights, the ceiling ZO could "
                       "reach; fleet: one server and N devices (many per process) over a real "
                       "Mosquitto for each N of --devices: round time, throughput, CPU, "
                       "memory, lost updates (cost)")
    bench.add_argument("--out", required=True,
                       help="directory for the report: cost.{json,md,png} or "
                       "accuracy.{json,md} with accuracy_{rounds,bytes}.png and runs/")
    _add_profile_options(bench, steps=None)
    bench.add_argument("--repeats", type=positive_int, default=1,
                       help="cost: run the sweep this many times, alternating the order; each "
                       "algorithm keeps its fastest run (1)")
    acc = bench.add_argument_group("accuracy workload")
    acc.add_argument("--datasets", default="digits,mnist-format",
                     help="comma-separated: digits, mnist-format, cifar-format, sst2 (text: "
                     "with --model minilm) (digits,mnist-format)")
    acc.add_argument("--mnist-dir", default=None,
                     help="MNIST idx files for mnist-format (default: generate digits-28, "
                     "sklearn digits drawn 28x28, as idx files; no download)")
    acc.add_argument("--cifar-dir", default=None,
                     help="CIFAR-10 python batches for cifar-format (default: generate "
                     "digits-32c, sklearn digits drawn 32x32 in colour, as CIFAR-10 batches; "
                     "no download)")
    acc.add_argument("--partitions", default="iid,dirichlet", help="iid,dirichlet")
    acc.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet alpha (0.5)")
    acc.add_argument("--algorithms",
                     default=",".join((*ALGORITHMS, "centralized")),
                     help="comma-separated (all six, and centralized: the same network trained "
                     "by torch on the union of the devices' data for as many samples as the "
                     "devices process, the ceiling)")
    acc.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    acc.add_argument("--devices", default=None,
                     help="devices per federation (accuracy: 5; fleet: a list, "
                     "10,100,300,1000)")
    acc.add_argument("--rounds", type=positive_int, default=None,
                     help="rounds, equal for all (accuracy: 20; fleet: 3)")
    acc.add_argument("--local-steps", type=positive_int, default=None,
                     help="local steps per round (accuracy: 40; fleet: 10)")
    acc.add_argument("--device-threads", type=positive_int, default=1,
                     help="threads per device (1)")
    acc.add_argument("--run-arg", action="append", metavar="OPT",
                     help="one more option for every `heron run`, e.g. --run-arg=--device-lr=0.005"
                     " (repeatable)")
    acc.add_argument("--no-reuse", action="store_true",
                     help="re-run federations already finished in --out/runs")
    fl = bench.add_argument_group("fleet workload (also --devices, --rounds, --local-steps, "
                                  "--model, --run-arg)")
    fl.add_argument("--dataset", default="digits",
                    help="fleet: the data set every federation trains on (digits)")
    fl.add_argument("--per-host", type=positive_int, default=250,
                    help="fleet: devices per `heron devices host` process (250)")
    fl.add_argument("--broker", dest="fleet_broker", default="mosquitto",
                    choices=("mosquitto", "embedded"),
                    help="fleet: a fresh Mosquitto per size (needs mosquitto installed) or "
                    "the embedded amqtt broker (mosquitto)")
    prog = bench.add_argument_group("progress workload")
    prog.add_argument("--from", dest="run_from", metavar="RUN_DIR", default=None,
                      help="a finished `heron run` directory (bundle, shards, run.json, "
                      "checkpoint.pt)")
    prog.add_argument("--every", type=positive_int, default=None,
                      help="steps between evaluations and optimizer restarts (the run's "
                      "--local-steps)")
    prog.add_argument("--device", default="dev-0",
                      help="whose shard trains; heldout: 500 held-out rows the server never "
                      "trained on (images: the first half of the test set, the second half "
                      "evaluates) (dev-0)")
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
                      "server's guide basis), activation (in each weight's top input "
                      "directions: the whole device, any model, with a random arm at its lr; "
                      "--heron-lr is then the first-order lr the ZO steps divide by n+2); one "
                      "heron arm each (random)")
    prog.add_argument("--act-rank", type=positive_int, default=4,
                      help="activation directions: input directions per weight (4)")
    prog.add_argument("--act-refresh", type=positive_int, default=20,
                      help="activation directions: steps between basis refreshes (20)")
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
                     "lora-B-lastN, lnbias-lastN, lnbias-all, ffnout-lastN, ffnnorm-lastN, "
                     "guided-K, random-K (a default list); "
                     "act-rR: measure the share of the mean gradient in the top-R input "
                     "directions (no training; any model)")
    scr.add_argument("--act-batches", type=positive_int, default=10,
                     help="screen act-rR: device batches whose inputs give the subspace (10)")
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
    # options of the progress and screen workloads, with their defaults: set under another
    # workload they would be ignored, so cmd_bench refuses them (a run option goes through
    # --run-arg instead)
    server_fixed = {a.dest: a.default for g in (prog, scr) for a in g._group_actions}
    bench.set_defaults(func=cmd_bench, server_fixed_options=server_fixed)
