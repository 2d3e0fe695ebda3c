"""`heron run`: a whole federation on this machine. It starts a broker (unless given one), hands
a `heron server` process one resolved config file, and starts the devices."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_runtime.algorithms import algorithm
from heron.cli.config import add_config_option, command_parser, write_config
from heron.cli.options import (
    add_broker,
    add_data,
    add_http,
    add_model_options,
    dataset_options,
    need_server_extra,
    nonneg_int,
    port_number,
    positive_float,
    positive_int,
    signame,
    usage,
)
from heron.cli.server import (
    SERVER_CONFIG,
    add_training,
    check_federation,
    check_model,
    check_page,
    check_resume,
    check_writable,
    need_tensorboard,
    resolve_model,
)

RUN_CONFIG = "config.toml"  # the run's resolved options: `heron run --config` re-runs it

SERVER_STOP_S = 30.0  # a signalled server stops between messages; minilm evaluates longer


def cmd_run(args: argparse.Namespace) -> int:
    resume = args.resume is not None
    if resume:
        args = _saved_run_args(Path(args.resume), args)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume and (out / "metrics.jsonl").exists() and not args.overwrite:
        usage("run", f"{out} already holds a run; help: pass --resume {out} to continue it, "
              "--overwrite to replace it, or another --out")
    if args.credentials_dir:
        missing = [n for n in ["server", *(f"dev-{i}" for i in range(args.devices))]
                   if not (Path(args.credentials_dir) / f"{n}.json").is_file()]
        if missing:
            usage("run", f"{args.credentials_dir} has no credentials for {missing}; help: "
                  f"`heron devices provision --out DIR server dev-0 ... "
                  f"dev-{args.devices - 1}` writes DIR/credentials/")
    check_federation(args)
    need_server_extra()
    check_page(args)
    need_tensorboard(args, "run")
    if args.model is None:  # resolved once here, so run.json and the server agree
        args.model = resolve_model(args, "run")
    check_model(args)
    if resume:
        check_resume(args, out)
    check_writable("run", out)
    from devices.fleet import FleetOptions, make_shards, start_devices, stop_all, terminate
    from heron.lifecycle import Stopped, StopSignals, child_env, exit_code
    from heron_data.datasets import DatasetError
    from heron_data.progress import throttled
    from server.broker import EmbeddedBroker, too_many_devices
    from server.records import WriteError, write_json

    saved = {k: v for k, v in vars(args).items()  # no secrets
             if k not in ("func", "resume", "overwrite", "password", "http_token", "config")}
    try:
        write_json(out / "run.json", saved)
        write_config(out / RUN_CONFIG, argparse.Namespace(**{**vars(args), "out": str(out)}),
                     "run")
    except WriteError as exc:
        usage("run", str(exc))
    fleet = FleetOptions(out=out, devices=args.devices, dataset=args.dataset,
                         data_dir=args.data_dir, partition=args.partition, alpha=args.alpha,
                         seed=args.seed, device_threads=args.device_threads, prefix=args.prefix,
                         torch_devices=algorithm(args.algorithm).runtime == "torch",
                         dataset_options=dataset_options(args),
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
                    make_shards(fleet, out / "shards",
                                throttled("heron run: wrote", "device shards"))
            except (DatasetError, ValueError) as exc:
                usage("run", str(exc))
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
                warning = too_many_devices(args.devices)
                if warning:
                    print(f"heron run: warning: {warning}", file=sys.stderr, flush=True)
            logs.mkdir(exist_ok=True)
            try:
                write_config(out / SERVER_CONFIG, server_args(args, url, out), "server")
            except WriteError as exc:
                print(f"heron run: {exc}", file=sys.stderr)
                return 1
            with signals.deferred():
                server = subprocess.Popen(
                    [sys.executable, "-m", "heron", "server", "--config", str(out / SERVER_CONFIG),
                     *(["--password", args.password] if args.password else []),  # not on disk
                     *(["--http-token", args.http_token] if args.http_token else []),
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
            print(f"\nheron run: {signame(exc.signum)}: stopping the server (every completed "
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
        print(f"heron run: stopped by {signame(stopped.signum)}"
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
        usage("run", f"cannot resume {out}: no readable run.json ({exc}); help: --resume takes "
              "the --out directory of an earlier `heron run`")
    if not isinstance(saved, dict):
        usage("run", f"cannot resume {out}: {out / 'run.json'} is not a JSON object")
    merged = vars(given).copy()
    merged.update({k: v for k, v in saved.items() if k in merged})
    merged["out"] = str(out)
    if given.broker:  # the broker may legitimately live elsewhere now
        merged["broker"] = given.broker
    _check_saved_types(merged, out / "run.json")
    return argparse.Namespace(**merged)


def _check_saved_types(values: dict[str, Any], path: Path) -> None:
    """Saved options get the command line's checks again: the file may have been edited."""
    for action in command_parser("run")._actions:
        value = values.get(action.dest)
        if action.type in (positive_int, nonneg_int, positive_float, port_number) and \
                value is not None:
            try:
                action.type(str(value))
            except argparse.ArgumentTypeError as exc:
                usage("run", f"cannot resume: {path} has {action.option_strings[0]} {value!r}: "
                      f"{exc}")


def server_args(args: argparse.Namespace, url: str, out: Path) -> argparse.Namespace:
    """The server's options from the run's: every option they share, this run's broker and
    directory (its --resume and --password travel on the command line, not in the file)."""
    parser = command_parser("server")
    server = parser.parse_args([])
    for action in parser._actions:
        if action.option_strings and action.dest in vars(args) and \
                action.dest not in ("broker", "out", "resume", "config"):
            setattr(server, action.dest, getattr(args, action.dest))
    server.broker, server.out = url, str(out)
    return server


def add_run_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="a whole federation on this machine (broker, server, "
                         "devices)")
    add_broker(run, required=False)
    add_data(run)
    add_training(run)
    add_model_options(run)
    add_http(run)
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
    add_config_option(run)
    run.set_defaults(func=cmd_run)
