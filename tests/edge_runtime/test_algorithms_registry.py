"""The algorithm registry: one consistent entry per algorithm, a lookup that names the
choices, and consumers that read it (so adding an algorithm is one registry line)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import ROOT

from edge_runtime.algorithms import (
    ALGORITHMS,
    AUX_ALGORITHMS,
    DEVICE_LR,
    ONNX_ALGORITHMS,
    TORCH_ALGORITHMS,
    Algorithm,
    algorithm,
    names,
)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_entry_is_consistent(name: str) -> None:
    a = ALGORITHMS[name]
    assert a.name == name
    assert a.family in ("aux-loss", "splitfed", "fedavg")
    assert (a.device_update is None) == (a.trained_parts == ())
    assert a.ships_server_part == ("server" in a.trained_parts)
    assert a.waits_for_gradient == (a.family == "splitfed")
    assert not a.server_copy_per_device or a.waits_for_gradient
    if a.aux_loss and a.device_update is not None:
        assert "aux" in a.trained_parts
    if a.runtime == "onnxruntime":  # no autograd there: ZO, or the exported tail gradient
        assert a.device_update in ("zo", "tail", None)
    else:
        assert a.device_update == "backprop"
    assert a.default_device_lr == DEVICE_LR[a.lr_class]


def test_the_known_algorithms_and_their_derived_lists() -> None:
    assert list(ALGORITHMS) == ["heron", "heron-tail", "cse-fsl", "sflv1", "sflv2", "fedavg",
                                "frozen"]
    assert ONNX_ALGORITHMS == ("heron", "heron-tail", "frozen")
    assert TORCH_ALGORITHMS == ("cse-fsl", "sflv1", "sflv2", "fedavg")
    assert AUX_ALGORITHMS == ("heron", "heron-tail", "cse-fsl", "frozen")
    assert names(needs_tail_graph=True) == ("heron-tail",)
    assert names(family="splitfed") == ("sflv1", "sflv2")
    assert names(server_copy_per_device=True) == ("sflv1",)
    assert algorithm("heron").default_device_lr == 3e-4
    assert algorithm("frozen").default_device_lr == 3e-4  # the ZO class: it never steps
    assert algorithm("cse-fsl").default_device_lr == 1e-3
    assert algorithm("heron-tail").default_device_lr == 3e-4  # the screen's Adam rate


@pytest.mark.parametrize("bad", ["fedprox", "", "HERON", None, 3])
def test_an_unknown_name_is_refused_with_the_choices(bad: object) -> None:
    with pytest.raises(ValueError, match="unknown algorithm .*help: choose one of heron, "
                                         "heron-tail, cse-fsl, sflv1, sflv2, fedavg, frozen"):
        algorithm(bad)  # type: ignore[arg-type]


def test_the_registry_imports_nothing_heavy() -> None:
    """The wire types and the board's device import it: no numpy, torch or onnxruntime."""
    code = ("import sys; import edge_runtime.algorithms; "
            "bad = {'numpy', 'torch', 'onnxruntime'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


THROWAWAY = dataclasses.replace(ALGORITHMS["heron"], name="heron-copy",
                                summary="a test-local copy of heron")


@pytest.fixture
def throwaway(monkeypatch: pytest.MonkeyPatch) -> Algorithm:
    """A new aux-loss algorithm registered for one test: the one line adding it takes."""
    monkeypatch.setitem(ALGORITHMS, THROWAWAY.name, THROWAWAY)
    return THROWAWAY


def test_a_registered_algorithm_is_accepted_everywhere_that_reads_the_registry(
        throwaway: Algorithm) -> None:
    from edge_runtime.protocol import TrainConfig
    from heron.cli import build_parser
    from heron.cli.server import train_config

    cfg = TrainConfig(algorithm=throwaway.name)  # the wire config's validation
    assert TrainConfig.from_json(cfg.to_json()).algorithm == throwaway.name
    for argv in (["run", "--algorithm", throwaway.name],
                 ["profile", "--algorithm", throwaway.name]):  # the CLI's choices
        args = build_parser().parse_args(argv)
        assert args.algorithm == throwaway.name
    run = build_parser().parse_args(["run", "--algorithm", throwaway.name])
    assert train_config(run).optimizer.lr == DEVICE_LR["zo"]  # its learning-rate class
    args = build_parser().parse_args(["bench", "--out", "x"])
    assert throwaway.name in args.algorithms.split(",")


def test_a_registered_algorithm_gets_its_familys_server_behaviour(throwaway: Algorithm) -> None:
    from baselines.counts import payload_bytes
    from edge_runtime.protocol import TrainConfig
    from server.policy import smashed_budget

    cfg = TrainConfig(algorithm=throwaway.name, local_steps=10, upload_every=3)
    assert smashed_budget(cfg) == smashed_budget(TrainConfig(local_steps=10, upload_every=3))
    kw = {"batch": 4, "smashed_shape": (2, 3, 3), "device_params": 50, "local_steps": 10,
          "upload_every": 3}
    assert payload_bytes(throwaway.name, **kw) == payload_bytes("heron", **kw)
