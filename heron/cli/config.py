"""`--config FILE` for `heron run` and `heron server`: a flat TOML file whose keys are the long
options (dashes or underscores), read through the flags' own argparse types; and the resolved
options written back beside a run's results, so that `--config` on that file re-runs it."""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from pathlib import Path
from typing import Any

from heron.cli.options import usage

# never read from or written to a config file: the file itself, and argparse's own --help
NOT_CONFIGURABLE = frozenset({"config", "help"})
# read when given, never written: what one invocation does (resume, overwrite), and a secret
NOT_WRITTEN = NOT_CONFIGURABLE | {"resume", "overwrite", "password", "http_token"}


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML file of options, keys as the long options without -- (rounds = "
                   "5, device-lr = 3e-4); flags given here override it. Every run writes its "
                   "resolved options to --out/config.toml (heron run) or --out/server.toml "
                   "(heron server), which --config takes to run it again")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def command_parser(command: str) -> argparse.ArgumentParser:
    from heron.cli import build_parser  # the whole parser, built where the commands meet

    return subcommands(build_parser())[command]


def _options(parser: argparse.ArgumentParser, skip: frozenset[str]) -> dict[str, argparse.Action]:
    """Long option name without -- -> its action."""
    return {next(o for o in a.option_strings if o.startswith("--"))[2:]: a
            for a in parser._actions
            if any(o.startswith("--") for o in a.option_strings) and a.dest not in skip}


def _typed(action: argparse.Action, value: Any) -> Any:
    """A TOML value through the flag's own checks; ValueError says what is wrong."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    numeric = action.type is not None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or \
            (numeric and isinstance(value, str)) or (not numeric and isinstance(value, float)):
        raise ValueError(f"expected {'a number' if numeric else 'a string'}")
    if numeric:
        assert callable(action.type)
        try:
            value = action.type(str(value))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
    else:
        value = str(value)  # an integer for a name-or-index option: text-column = 0
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"choose one of {', '.join(map(str, action.choices))}")
    return value


def read_config(path: Path, parser: argparse.ArgumentParser, command: str) -> dict[str, Any]:
    """The file's options as argparse destinations; a bad file, key or value is exit 2."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        usage(command, f"cannot read --config {path}: {exc.strerror or exc}")
    except tomllib.TOMLDecodeError as exc:
        usage(command, f"--config {path} is not valid TOML: {exc}")
    options = _options(parser, NOT_CONFIGURABLE)
    values: dict[str, Any] = {}
    for key, value in data.items():
        action = options.get(key.replace("_", "-"))
        if action is None:
            close = difflib.get_close_matches(key.replace("_", "-"), options, n=3)
            hint = (f"did you mean {' or '.join(close)}?" if close else
                    f"the keys are `heron {command}`'s long options without --, see --help")
            usage(command, f"--config {path}: unknown key {key!r}; help: {hint}")
        try:
            values[action.dest] = _typed(action, value)
        except ValueError as exc:
            usage(command, f"--config {path}: {key} = {value!r}: {exc}")
    return values


def config_text(args: argparse.Namespace, command: str) -> str:
    """Every option of `heron COMMAND` with its value in ARGS, as TOML (unset ones named in a
    comment: TOML has no null)."""
    import tomli_w

    values: dict[str, Any] = {}
    unset = []
    for name, action in _options(command_parser(command), NOT_WRITTEN).items():
        value = getattr(args, action.dest, None)
        if value is None:
            unset.append(name)
        else:
            values[name] = str(value) if isinstance(value, Path) else value
    head = (f"# the resolved options of `heron {command}`; `heron {command} --config FILE` "
            "runs it again (flags override)\n")
    if unset:
        head += "\n".join(textwrap.wrap("not set, their defaults apply: " + ", ".join(unset),
                                        width=96, initial_indent="# ",
                                        subsequent_indent="#   ", break_on_hyphens=False)) + "\n"
    return head + tomli_w.dumps(values)


def write_config(path: Path, args: argparse.Namespace, command: str) -> None:
    """Write the resolved options atomically (raises server.records.WriteError)."""
    from server.records import atomic_write_bytes

    atomic_write_bytes(path, config_text(args, command).encode())
