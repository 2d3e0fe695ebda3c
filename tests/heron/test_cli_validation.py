"""`heron run`, `heron server` and `heron device` refuse invalid options in the console, with
exit code 2, before they write anything, start a broker or start a device."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, heron

from heron.cli import main

BAD_VALUES = [
    (["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
    (["--rounds", "ten"], "argument --rounds: expected a whole number >= 1, got 'ten'"),
    (["--devices", "0"], "argument --devices: must be >= 1"),
    (["--local-steps", "-5"], "argument --local-steps: must be >= 1"),
    (["--upload-every", "0"], "argument --upload-every: must be >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["--q", "0"], "argument --q: must be >= 1"),
    (["--device-lr", "nan"], "argument --device-lr: must be a finite number > 0, got 'nan'"),
    (["--server-lr", "inf"], "argument --server-lr: must be a finite number > 0, got 'inf'"),
    (["--server-lr", "-0.001"], "argument --server-lr: must be a finite number > 0"),
    (["--mu", "0"], "argument --mu: must be a finite number > 0"),
    (["--round-timeout", "0"], "argument --round-timeout: must be a finite number > 0"),
    (["--join-timeout=-inf"], "argument --join-timeout: must be a finite number > 0"),
    (["--max-update-norm", "nan"], "argument --max-update-norm: must be a finite number > 0"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--limit", "0"], "argument --limit: must be >= 1"),
    (["--per-round", "4"], "--per-round 4 is more than --devices 3"),
    (["--min-devices", "4"], "--min-devices 4 is more than --devices 3"),
    (["--dataset", "imagenet"], "unknown --dataset 'imagenet'"),
    (["--model", "minilm"], "--model minilm takes text but --dataset digits holds images"),
    (["--lora-rank", "4"], "--lora-rank only apply to --model minilm"),
    (["--aux-from-server", "--algorithm", "sflv2"], "--aux-from-server applies to"),
    (["--model", "vgg"], "unknown --model 'vgg'"),
    (["--cut", "conv9"], "unknown --cut 'conv9' for --model cnn; help: choose one of conv1"),
    (["--deterministic", "--algorithm", "sflv2"],
     "--deterministic does not apply to --algorithm sflv2"),
    (["--deterministic", "--min-devices", "2"],
     "--deterministic cannot be used with --min-devices"),
    (["--device-sync", "replay", "--algorithm", "cse-fsl"],
     "--device-sync replay needs a device that trains by ZO (heron)"),
    (["--device-sync", "replay", "--algorithm", "frozen"],
     "--device-sync replay needs a device that trains by ZO (heron)"),
]
RUN_ONLY = [
    (["--broker-port", "70000"], "argument --broker-port: a TCP port is 1..65535"),
    (["--alpha", "nan"], "argument --alpha: must be a finite number > 0"),
    (["--device-threads", "0"], "argument --device-threads: must be >= 1"),
]


def _argv(command: str, out: Path, extra: list[str]) -> list[str]:
    if command == "server":
        return ["server", "--broker", "mqtt://127.0.0.1:1", "--out", str(out), *extra]
    return ["run", "--out", str(out), *extra]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), BAD_VALUES, ids=[" ".join(e) for e, _ in BAD_VALUES])
@pytest.mark.parametrize("command", ["run", "server"])
def test_an_invalid_value_is_refused_before_anything_starts(
        command: str, extra: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert message in _refused(_argv(command, out, extra), capsys)
    assert not out.exists()  # no run directory, so no run.json, shards, logs or broker


@pytest.mark.parametrize(("extra", "message"), RUN_ONLY, ids=[" ".join(e) for e, _ in RUN_ONLY])
def test_an_invalid_run_option_is_refused(extra: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert message in _refused(_argv("run", out, extra), capsys)
    assert not out.exists()


@pytest.mark.parametrize("workload", ["accuracy", "cost", "fleet"])
def test_bench_refuses_an_option_its_workload_would_ignore(
        workload: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --aux-from-server is the screen's; an accuracy bench ran without it, silently
    err = _refused(["bench", "--workload", workload, "--out", str(tmp_path / "b"),
                    "--aux-from-server", "--lrs", "1e-3"], capsys)
    assert f"--workload {workload} does not use --aux-from-server, --lrs" in err
    assert "--run-arg=--OPTION" in err and not (tmp_path / "b").exists()


def test_the_real_command_exits_2_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(heron("run", "--out", str(out), "--server-lr", "nan"), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--server-lr: must be a finite number > 0, got 'nan'" in proc.stderr
    assert proc.stdout == "" and not out.exists()


# -- --out ----------------------------------------------------------------------------------
@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only filesystem (root ignores file modes, not a read-only mount)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k",
                                            "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount (a read-only tmpfs)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("command", ["run", "server"])
def test_an_unwritable_out_is_refused(command: str, read_only_dir: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(_argv(command, read_only_dir / "run", []), capsys)
    assert f"cannot write to --out {read_only_dir / 'run'}: Read-only file system" in err


def test_an_out_below_a_file_is_refused(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    err = _refused(_argv("run", tmp_path / "file" / "run", []), capsys)
    assert "cannot write to --out" in err
    assert not (tmp_path / "file").is_dir()


# -- --resume -------------------------------------------------------------------------------
def _checkpoint(path: Path, **changes: object) -> None:
    import torch

    state: dict[str, object] = {
        "round": 2, "run_id": "abc", "device_weights": torch.zeros(4),
        "server_state": {}, "server_optimizer": {},
        "manifest": {"model": "cnn", "cut": "conv1"}, "train_config": {"algorithm": "heron"},
        "records": [{"round": 1}, {"round": 2}], "counters": {}}
    state.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del state[key]
    torch.save(state, path)


def _interrupted_run(tmp_path: Path, **saved: object) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"out": str(run), "rounds": 4, "devices": 2,
                                              **saved}))
    return run


CORRUPT = [
    (b"", "is damaged or not a heron checkpoint"),
    (b"PK\x03\x04 half of a zip", "is damaged or not a heron checkpoint"),
]


@pytest.mark.parametrize(("data", "message"), CORRUPT, ids=["empty", "truncated"])
def test_run_resume_refuses_a_corrupt_checkpoint(data: bytes, message: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = _interrupted_run(tmp_path)
    (run / "checkpoint.pt").write_bytes(data)
    before = sorted(p.name for p in run.iterdir())
    err = _refused(["run", "--resume", str(run)], capsys)
    assert f"cannot resume: cannot read {run / 'checkpoint.pt'}: it {message}" in err
    assert sorted(p.name for p in run.iterdir()) == before  # no shards, logs, bundle


@pytest.mark.parametrize(("changes", "message"), [
    ({"manifest": {"model": "resnet18", "cut": "layer1"}},
     "was written by a run with --model resnet18 (given: cnn)"),
    ({"train_config": {"algorithm": "fedavg"}},
     "was written by a run with --algorithm fedavg (given: heron)"),
    ({"records": None}, "is not a heron checkpoint (no records)"),
    ({"records": [{"round": 1}]}, "is inconsistent: round 2 with 1 round records"),
], ids=["model", "algorithm", "missing", "inconsistent"])
def test_resume_refuses_a_checkpoint_of_another_run(changes: dict, message: str,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = _interrupted_run(tmp_path)
    _checkpoint(run / "checkpoint.pt", **changes)
    assert message in _refused(["run", "--resume", str(run)], capsys)
    assert message in _refused(["server", "--broker", "mqtt://127.0.0.1:1", "--out", str(run),
                                "--resume"], capsys)
    assert not (run / "logs").exists() and not (run / "bundle").exists()


def test_run_resume_checks_the_saved_options_again(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = _interrupted_run(tmp_path, rounds=0)
    err = _refused(["run", "--resume", str(run)], capsys)
    assert f"cannot resume: {run / 'run.json'} has --rounds 0: must be >= 1" in err


def test_run_resume_needs_a_run_directory(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["run", "--resume", str(tmp_path / "nothing")], capsys)
    assert "no readable run.json" in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--id", "a/b"], "device id 'a/b' is not allowed"),
    (["--prefix", "fleet/#"], "topic prefix 'fleet/#' must be"),
    (["--prefix", "/fleet"], "topic prefix '/fleet' must be"),
])
def test_device_refuses_an_id_or_prefix_that_is_no_topic_level(
        extra: list[str], message: str, tmp_path: Path) -> None:
    from heron.cli import build_parser

    argv = ["device", "--broker", "mqtt://127.0.0.1:1", "--id", "dev-0",
            "--data", str(tmp_path / "shard.npz"), *extra]
    args = build_parser().parse_args(argv)
    with pytest.raises(SystemExit, match=re.escape(message)):
        args.func(args)
