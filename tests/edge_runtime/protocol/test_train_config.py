"""One default per setting: the config's, read by the CLI; the protocol stays numpy-only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge_runtime.algorithms import DEVICE_LR
from edge_runtime.protocol import OptimizerConfig, TrainConfig, ZOConfig

ROOT = Path(__file__).resolve().parents[3]


def test_nested_configs_default_to_the_train_configs_defaults() -> None:
    cfg = TrainConfig()
    assert cfg.optimizer == OptimizerConfig() and cfg.zo == ZOConfig()
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == DEVICE_LR["zo"]


def test_the_default_codec_is_int8_and_a_config_without_one_means_fp32() -> None:
    cfg = TrainConfig()
    assert cfg.smashed_codec == "int8"
    assert TrainConfig.from_json(cfg.to_json()).smashed_codec == "int8"  # always on the wire
    # a server from before the codecs sends no such key and decodes only float32 uploads
    old = {k: v for k, v in cfg.to_json().items() if k != "smashed_codec"}
    assert TrainConfig.from_json(old).smashed_codec == "fp32"


def test_cli_defaults_are_the_configs() -> None:
    from heron.cli import build_parser
    from heron.cli.server import train_config

    args = build_parser().parse_args(["run"])
    assert train_config(args) == TrainConfig()


def test_protocol_imports_nothing_heavier_than_numpy() -> None:
    code = ("import sys, edge_runtime.protocol\n"
            "heavy = {'onnxruntime', 'torch', 'paho', 'psutil'} & {m.split('.')[0] for m in "
            "sys.modules}\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
