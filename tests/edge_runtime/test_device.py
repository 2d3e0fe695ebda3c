"""The device's reading of the server's presence: the run's training config sizes the
join-time memory check; a presence without one, or a malformed one, falls back to the
default."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from edge_runtime.device import announced_config
from edge_runtime.protocol import Presence, TrainConfig, decode, encode, server_info


def test_the_servers_presence_carries_the_runs_training_config() -> None:
    cfg = TrainConfig(batch_size=16, local_steps=5)
    sent = Presence("run", -1, "server", info=server_info("cnn", "conv2", "digits",
                                                          cfg.to_json()))
    got = decode(encode(sent))
    assert isinstance(got, Presence) and announced_config(got.info) == cfg


def test_a_presence_without_a_config_announces_nothing() -> None:
    assert announced_config({"model": "cnn", "cut": "conv2", "dataset": "digits"}) is None
    assert announced_config({}) is None


@pytest.mark.parametrize("train", [
    {"batch_size": 0}, {"batch_size": -4}, {"batch_size": 16.0}, {"batch_size": "16"},
    {"batch_size": True}, {"local_steps": 5}, {"batch_size": 16, "no_such_key": 1},
    {"batch_size": 16, "zo": "nope"}, [16], "16",
])
def test_a_malformed_config_is_ignored_with_a_warning(
        train: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="heron.device"):
        assert announced_config({"model": "cnn", "train": train}) is None
    assert "ignoring the training config in the server's presence" in caplog.text
    assert "batch size 32" in caplog.text


def test_info_that_is_not_an_object_is_ignored() -> None:
    assert announced_config(["train"]) is None
