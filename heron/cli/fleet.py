"""The fleet tools: `heron devices partition|pack|provision|host`, `heron export` (a device
bundle) and `heron broker` (the embedded broker)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from edge_runtime.protocol import topics
from heron.cli.options import (
    add_broker,
    add_data,
    add_model_options,
    dataset_options,
    model_options,
    mqtt_credentials,
    need_server_extra,
    nonneg_int,
    port_number,
    positive_float,
    positive_int,
    setup_logging,
)


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



def cmd_partition(args: argparse.Namespace) -> int:
    need_server_extra()
    from devices.fleet import FleetOptions, make_shards
    from heron_data.datasets import DatasetError

    fleet = FleetOptions(out=Path(args.out), devices=args.devices, dataset=args.dataset,
                         data_dir=args.data_dir, partition=args.partition, alpha=args.alpha,
                         seed=args.seed, dataset_options=dataset_options(args))
    from heron_data.progress import throttled

    target = Path(args.out)
    print(f"heron devices partition: loading {args.dataset} and writing {args.devices} shards "
          f"to {target}", flush=True)
    try:
        make_shards(fleet, target, throttled("heron devices partition: wrote", "shards"))
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


def cmd_host(args: argparse.Namespace) -> int:
    """Many devices in this one process (`devices.host`): the fleet bench's device side."""
    from edge_runtime.device import DeviceOptions
    from heron.lifecycle import Stopped, StopSignals, exit_code

    setup_logging(args.verbose)
    shards = Path(args.shards)
    ids = args.ids.split(",") if args.ids else [
        p.stem for p in sorted(shards.glob("dev-*.npz"), key=lambda p: int(p.stem[4:]))]
    if args.count is not None:
        ids = ids[args.first:args.first + args.count]
    elif args.first:
        ids = ids[args.first:]
    if not ids:
        raise SystemExit(f"heron devices host: no devices to host from {shards}; help: "
                         "`heron devices partition --out DIR` writes the shards")
    try:
        for i in ids:
            topics.validate_id(i)
        from devices.host import host_devices, shard_options

        base = DeviceOptions(broker=args.broker, device_id=ids[0], data=shards,
                             prefix=args.prefix, threads=args.threads,
                             credentials=mqtt_credentials(args),
                             bundle_cache=Path(args.bundle_cache) if args.bundle_cache else None)
        opts = shard_options(shards, ids, base)
        if args.credentials_dir:  # a provisioned broker: each device logs in as itself
            from dataclasses import replace

            opts = [replace(o, credentials=_device_credentials(args, o.device_id)) for o in opts]
    except ValueError as exc:
        raise SystemExit(f"heron devices host: {exc}") from exc
    print(f"heron devices host: {len(ids)} devices ({ids[0]} .. {ids[-1]}) in this process, "
          f"broker {args.broker}", flush=True)
    with StopSignals():  # a signal ends the process; the broker then sends each device's will
        try:
            result = host_devices(opts)
        except ValueError as exc:
            raise SystemExit(f"heron devices host: {exc}") from exc
        except Stopped as exc:
            print(f"heron devices host: {exc}", file=sys.stderr, flush=True)
            return exit_code(exc.signum)
    bad = {d: e for d, e in result.errors.items() if result.codes.get(d)}
    print(f"heron devices host: {len(ids) - len(bad)}/{len(ids)} devices ended cleanly"
          + (f"; first error: {next(iter(bad))}: {next(iter(bad.values()))}" if bad else ""),
          flush=True)
    return 1 if bad else 0


def _device_credentials(args: argparse.Namespace, device_id: str) -> Any:
    """DIR/ID.json from `heron devices provision`, read as `--credentials` would be."""
    path = Path(args.credentials_dir) / f"{device_id}.json"
    one = argparse.Namespace(**{**vars(args), "credentials": str(path)})
    return mqtt_credentials(one)


def cmd_export(args: argparse.Namespace) -> int:
    need_server_extra()
    from exporter.export import export_split
    from exporter.zoo import default_model
    from heron_data.datasets import DatasetError, load_dataset

    if args.input_shape:
        shape = tuple(int(s) for s in args.input_shape.split(","))
        classes = args.num_classes
        args.model = args.model or default_model(shape)
    else:
        try:
            ds = load_dataset(args.dataset, args.data_dir, **dataset_options(args))
        except DatasetError as exc:
            raise SystemExit(f"heron export: {exc}") from exc
        shape, classes = ds.input_shape, ds.num_classes
        args.model = args.model or default_model(shape, ds.input_dtype)
    try:
        m = export_split(args.model, shape, classes, args.out, cut=args.cut, seed=args.seed,
                         opset=args.opset, **model_options(args))
    except ValueError as exc:
        raise SystemExit(f"heron export: {exc}") from exc
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    print(f"bundle {args.out}: {m.model} cut {m.cut}, input {m.input_shape}, smashed "
          f"{m.smashed_shape}, {m.num_params} trainable params "
          f"({sum(p.size for p in m.params if p.role == 'aux')} in the aux head), "
          f"{size / 1e6:.2f} MB")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    need_server_extra()
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




def add_fleet_parsers(sub: Any) -> None:
    devs = sub.add_parser("devices", help="fleet tools")
    dsub = devs.add_subparsers(dest="devices_command", required=True)
    part = dsub.add_parser("partition", help="split a dataset into one shard per device")
    add_data(part)
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

    host = dsub.add_parser(
        "host", help="run many devices in this one process, each with its own MQTT client, "
        "id and shard; they share the ONNX Runtime session (for fleets of hundreds on one "
        "machine)")
    add_broker(host, required=True)
    host.add_argument("--shards", required=True,
                      help="directory of dev-N.npz shards (`heron devices partition --out`)")
    host.add_argument("--ids", default=None,
                      help="comma-separated device ids (default: every dev-N.npz in --shards)")
    host.add_argument("--first", type=nonneg_int, default=0,
                      help="skip this many of the ids (0)")
    host.add_argument("--count", type=positive_int, default=None,
                      help="host at most this many of the ids (default: all)")
    host.add_argument("--threads", type=positive_int, default=1,
                      help="ONNX Runtime threads shared by all devices of the process (1)")
    host.add_argument("--credentials-dir", default=None,
                      help="DIR/credentials from `heron devices provision`: device ID logs in "
                      "with ID.json (default: --credentials or --username for all)")
    host.add_argument("--bundle-cache", default=None,
                      help="where bundles whose frozen tensors are memory-mapped are stored")
    host.set_defaults(func=cmd_host)

    exp = sub.add_parser("export", help="write a device bundle (ONNX + weights + manifest)")
    add_data(exp)
    exp.add_argument("--model", default=None, help="cnn, fedcnn, resnet18 or minilm (default: "
                     "fedcnn for 1x28x28 inputs, minilm for text, cnn otherwise)")
    add_model_options(exp)
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
