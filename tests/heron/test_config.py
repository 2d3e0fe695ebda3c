"""`--config FILE` of `heron run` / `heron server`, the resolved config every run writes, and
the flags checked against the option dataclasses they fill (so the two cannot drift)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, heron

from heron.cli import main, parse_args
from heron.cli.config import NOT_WRITTEN, command_parser, config_text
from heron.cli.run import server_args
from heron.cli.server import server_options


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "opts.toml"
    path.write_text(text)
    return path


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_the_file_sets_options_and_flags_override_it(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'rounds = 5\ndevice-lr = 0.01\nper_round = 2\naux-from-server = true\n'
                 'aggregate = "median"\ntext-column = 0\nmu = 1\n')
    args = parse_args(["run", "--config", str(path), "--rounds", "7"])
    assert (args.rounds, args.device_lr, args.per_round, args.aux_from_server) == (7, 0.01, 2, True)
    assert (args.aggregate, args.text_column, args.mu) == ("median", "0", 1.0)
    assert args.devices == 3  # neither in the file nor on the command line: the default


def test_server_takes_broker_and_out_from_the_file(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = _toml(tmp_path, 'broker = "mqtt://h:1"\nout = "o"\n')
    args = parse_args(["server", "--config", str(path)])
    assert (args.broker, args.out) == ("mqtt://h:1", "o")
    err = _refused(["server", "--rounds", "2"], capsys)
    assert "the following arguments are required: --broker, --out" in err


@pytest.mark.parametrize(("text", "message"), [
    ("rounds = 0\n", "rounds = 0: must be >= 1, got 0"),
    ("trim = 0.5\n", "trim = 0.5: the fraction cut at each end must be in [0, 0.5)"),
    ('device-lr = "fast"\n', "device-lr = 'fast': expected a number"),
    ("rounds = true\n", "rounds = True: expected a number"),
    ('aggregate = "avg"\n', "aggregate = 'avg': choose one of mean, median, trimmed-mean"),
    ("aux-from-server = 1\n", "aux-from-server = 1: expected true or false"),
    ("dataset = 1.5\n", "dataset = 1.5: expected a string"),
    ("roundz = 3\n", "unknown key 'roundz'; help: did you mean rounds"),
    ("partition = 'iid'\n", "unknown key 'partition'"),  # a `heron run` option, not the server's
    ("rounds = \n", "is not valid TOML"),
])
def test_a_bad_key_or_value_is_exit_2_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    path = _toml(tmp_path, text)
    err = _refused(["server", "--broker", "mqtt://h:1", "--out", "o", "--config", str(path)],
                   capsys)
    assert f"heron server: --config {path}" in err
    assert message in err


def test_a_missing_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["run", "--config", str(tmp_path / "nope.toml")], capsys)
    assert f"heron run: cannot read --config {tmp_path / 'nope.toml'}" in err


RUN_ARGV = ["--rounds", "3", "--devices", "4", "--per-round", "2", "--device-lr", "0.002",
            "--aggregate", "trimmed-mean", "--trim", "0.3", "--aux-from-server", "--cut", "conv2",
            "--model", "fedcnn", "--username", "u", "--password", "secret", "--partition",
            "dirichlet", "--alpha", "0.1", "--out", "o", "--limit", "300", "--overwrite"]


def _comparable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in NOT_WRITTEN | {"func"}}


def test_the_resolved_config_round_trips(tmp_path: Path) -> None:
    args = parse_args(["run", *RUN_ARGV])
    text = config_text(args, "run")
    assert "secret" not in text and "overwrite" not in text  # no secrets, no one-off actions
    assert "# not set, their defaults apply:" in text and "broker" in text
    again = parse_args(["run", "--config", str(_toml(tmp_path, text))])
    assert _comparable(again) == _comparable(args)


def test_heron_run_hands_its_server_the_shared_options(tmp_path: Path) -> None:
    run = parse_args(["run", *RUN_ARGV, "--quarantine-after", "4", "--clip-update-norm", "2.5"])
    path = _toml(tmp_path, config_text(server_args(run, "mqtt://x:1", Path("o")), "server"))
    server = parse_args(["server", "--config", str(path)])
    assert (server.broker, server.out, server.password, server.resume) == \
        ("mqtt://x:1", "o", None, False)
    shared = {k: v for k, v in _comparable(run).items() if k in vars(server) and k != "command"}
    assert {k: getattr(server, k) for k in shared} == {**shared, "broker": "mqtt://x:1"}


# -- flags against the option dataclasses ----------------------------------------------------
def _leaf_fields(cls: type, prefix: str, stop: set[str]) -> set[str]:
    """Dotted names of every field, descending into dataclass-typed fields."""
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    leaves: set[str] = set()
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                 if dataclasses.is_dataclass(t)]
        if kinds and name not in stop:
            leaves |= _leaf_fields(kinds[0], name + ".", stop)
        else:
            leaves.add(name)
    return leaves


def _flags(command: str) -> set[str]:
    return {a.dest for a in command_parser(command)._actions if a.option_strings}


CREDENTIALS = {"credentials.username": ("username",), "credentials.password": ("password",),
               "credentials.ca_file": ("ca_file",), "credentials.cert_file": ("cert_file",),
               "credentials.key_file": ("key_file",)}
# ServerOptions field -> the flags that fill it (one each, except the keyword dicts)
SERVER_FIELDS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in (
        "broker", "out", "dataset", "data_dir", "model", "cut", "devices", "rounds", "per_round",
        "server_optimizer", "server_lr", "weighting", "seed", "prefix", "join_timeout",
        "round_timeout", "min_devices", "resume", "max_update_norm", "clip_update_norm",
        "aggregate", "trim", "aux_from_server", "deterministic", "eval_every", "eval_limit",
        "tensorboard", "http", "http_token")},
    "threads": ("server_threads",),
    "train.algorithm": ("algorithm",), "train.local_steps": ("local_steps",),
    "train.upload_every": ("upload_every",), "train.batch_size": ("batch_size",),
    "train.seed": ("seed",),
    "train.smashed_codec": ("smashed_codec",), "train.zo.mu": ("mu",), "train.zo.q": ("q",),
    "train.zo.scheme": ("scheme",), "train.zo.distribution": ("distribution",),
    "train.zo.perturb": ("zo_perturb",), "train.device_sync": ("device_sync",),
    "train.optimizer.name": ("device_optimizer",),
    "train.optimizer.lr": ("device_lr",), "limits.quarantine_after": ("quarantine_after",),
    **CREDENTIALS,
    "dataset_options": ("limit", "text_column", "label_column", "no_header", "max_length",
                        "minilm_dir"),
    "model_options": ("lora_rank", "lora_alpha", "server_train", "minilm_dir"),
}
SERVER_FIELDS_WITHOUT_FLAG = {
    "train.optimizer.beta1": "Adam's constants are the usual ones, not tuned per run",
    "train.optimizer.beta2": "as beta1", "train.optimizer.eps": "as beta1",
    "train.optimizer.weight_decay": "as beta1 (no weight decay on ZO estimates)",
    "limits.rates": "per-device rate limits sized for honest devices (server.policy)",
    "limits.bundle": "as rates", "limits.max_declared_samples": "as rates",
    "max_weight_abs": "a sanity bound that marks a broken update, not a setting",
}
SERVER_FLAGS_WITHOUT_FIELD = {
    "help": "argparse's", "config": "the file of these same flags",
    "credentials": "a file read into the credentials.* fields",
}


def test_every_server_option_field_has_its_flag_and_every_flag_a_field() -> None:
    from server.options import ServerOptions

    stop = set(SERVER_FIELDS) | set(SERVER_FIELDS_WITHOUT_FLAG)
    assert _leaf_fields(ServerOptions, "", stop) == stop
    assert not set(SERVER_FIELDS) & set(SERVER_FIELDS_WITHOUT_FLAG)
    mapped = {flag for flags in SERVER_FIELDS.values() for flag in flags}
    assert mapped | set(SERVER_FLAGS_WITHOUT_FIELD) == _flags("server")
    assert not mapped & set(SERVER_FLAGS_WITHOUT_FIELD)


def _field(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_each_server_flag_reaches_its_field() -> None:
    """One flag at a time set to a value unlike its default lands in its field."""
    parser = command_parser("server")
    base = ["--broker", "mqtt://h:1", "--out", "o"]
    defaults = parser.parse_args(base)
    for dotted, flags in SERVER_FIELDS.items():
        if len(flags) != 1 or flags[0] in ("broker", "out"):
            continue
        action = next(a for a in parser._actions if a.dest == flags[0])
        if isinstance(action, argparse._StoreTrueAction):
            argv, want = [action.option_strings[0]], True
        elif action.choices:
            want = next(c for c in action.choices if c != action.default)
            argv = [action.option_strings[0], want]
        elif action.type is not None:
            text = "0.37" if flags[0] == "trim" else "7"
            argv, want = [action.option_strings[0], text], action.type(text)
        else:
            argv, want = [action.option_strings[0], "x7"], "x7"
        args = parser.parse_args([*base, *argv])
        assert getattr(args, flags[0]) != getattr(defaults, flags[0]), dotted
        got = _field(server_options(args), dotted)
        assert (str(got) if isinstance(got, Path) else got) == want, dotted  # --tensorboard


DEVICE_FIELDS = {"broker": ("broker",), "device_id": ("id",), "data": ("data",),
                 "prefix": ("prefix",), "bundle": ("bundle",), "threads": ("threads",),
                 "profile": ("profile",), "bundle_cache": ("bundle_cache",), **CREDENTIALS}
DEVICE_FIELDS_WITHOUT_FLAG = {"wait_server_s": "how long a device waits for a server; fixed"}
DEVICE_FLAGS_WITHOUT_FIELD = {
    "help": "argparse's", "config": "device.toml, a file of these same flags",
    "credentials": "a file read into the credentials.* fields",
    "torch": "picks the device class (the torch baselines), not an option of it",
    "dry_run": "a different action: the memory check, no broker",
    "batch_size": "--dry-run's largest batch",
}


def test_every_device_option_field_has_its_flag_and_every_flag_a_field() -> None:
    from edge_runtime.device import DeviceOptions

    stop = set(DEVICE_FIELDS) | set(DEVICE_FIELDS_WITHOUT_FLAG)
    assert _leaf_fields(DeviceOptions, "", stop) == stop
    mapped = {flag for flags in DEVICE_FIELDS.values() for flag in flags}
    assert mapped | set(DEVICE_FLAGS_WITHOUT_FIELD) == _flags("device")


# -- a real run writes its config, and that config runs it again -----------------------------
TINY = ["--devices", "2", "--rounds", "1", "--local-steps", "2", "--limit", "200",
        "--join-timeout", "120"]


@pytest.mark.slow
def test_a_run_rerun_from_its_config_writes_the_same_config(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    proc = subprocess.run(heron("run", "--out", str(first), *TINY), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    server = (first / "server.toml").read_text()
    assert f'out = "{first}"' in server and 'broker = "mqtt://' in server
    proc = subprocess.run(heron("run", "--config", str(first / "config.toml"), "--out",
                                str(second)), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (second / "config.toml").read_text() == \
        (first / "config.toml").read_text().replace(str(first), str(second))
