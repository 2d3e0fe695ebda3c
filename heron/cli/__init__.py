"""The `heron` command. Device subcommands need only the device install; the rest import
torch lazily and, when it is missing, say which extra to install."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from heron.cli.bench import add_bench_parsers
from heron.cli.config import read_config, subcommands
from heron.cli.device import add_device_parser
from heron.cli.fleet import add_fleet_parsers
from heron.cli.run import add_run_parser
from heron.cli.server import add_server_parser

CONFIGURED = ("run", "server")  # the subcommands that take --config FILE (TOML)
REQUIRED = {"server": ("broker", "out")}  # on the command line or in --config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heron", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    add_server_parser(sub)
    add_device_parser(sub)
    add_fleet_parsers(sub)
    add_bench_parsers(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, over the --config file of `heron run` / `heron server` if given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in CONFIGURED:
        return args
    sub = subcommands(parser)[args.command]
    if args.config:
        sub.set_defaults(**read_config(Path(args.config), sub, args.command))
        args = parser.parse_args(argv)  # the flags given override the file's defaults
    missing = [f"--{d.replace('_', '-')}" for d in REQUIRED.get(args.command, ())
               if getattr(args, d) is None]
    if missing:
        sub.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from heron.lifecycle import die_with_parent

    die_with_parent()  # a child of `heron run` stops when that parent dies
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
