"""`heron device`: one device. Needs only the device install (no torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edge_runtime.protocol import topics
from heron.cli.options import add_broker, mqtt_credentials, positive_int, setup_logging


def cmd_device(args: argparse.Namespace) -> int:
    from edge_runtime.profiles import ProfileError, load_device_config, load_profile

    setup_logging(args.verbose)
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
        topics.validate_prefix(args.prefix)
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
        credentials=mqtt_credentials(args), profile=profile,
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




def add_device_parser(sub: Any) -> None:
    dev = sub.add_parser("device", help="one device (needs only the device install)")
    add_broker(dev, required=False, default=" (required, here or in --config)")
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
