"""Server strategies, each against a reference computed by hand in torch: the aux-loss
family trains the server part and sends nothing back, SplitFed answers with the cut-layer
gradient torch's autograd gives (V1 on a copy per device, averaged by samples), FedAvg
ships and loads the whole model and never takes smashed data."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_runtime.algorithms import ALGORITHMS, Algorithm
from edge_runtime.manifest import Manifest
from exporter.export import export_bundle, flat_from_split
from exporter.zoo import SplitModel, build_split
from server.aggregate import DeviceUpdate, aggregate
from server.strategies import (
    STRATEGIES,
    AuxLossStrategy,
    FedAvgStrategy,
    ServerStrategy,
    SplitFedStrategy,
    server_strategy,
)
from server.trainer import ServerTrainer, server_flat

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[SplitModel, Manifest]:
    split = build_split("cnn", (1, 8, 8), NUM_CLASSES, seed=0)
    manifest = export_bundle(split, Path(tmp_path_factory.mktemp("bundle")))
    return split, manifest


def _strategy(name: str, setup: tuple[SplitModel, Manifest]) -> ServerStrategy:
    split, manifest = copy.deepcopy(setup[0]), setup[1]
    trainer = ServerTrainer(split.server, optimizer="adam", lr=1e-2,
                            smashed_shape=manifest.smashed_shape, num_classes=NUM_CLASSES)
    return server_strategy(name, trainer, split, manifest)


def _batch(shape: tuple[int, ...], seed: int, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *shape)).astype(np.float32),
            rng.integers(0, NUM_CLASSES, n).astype(np.int64))


def _reference_step(model: torch.nn.Module, acts: np.ndarray, labels: np.ndarray,
                    lr: float = 1e-2) -> tuple[torch.nn.Module, float, np.ndarray]:
    """One Adam step of a copy by hand: (the stepped copy, loss, dL/d acts)."""
    ref = copy.deepcopy(model)
    ref.train()
    opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=lr)
    x = torch.from_numpy(acts.copy()).requires_grad_(True)
    loss = F.cross_entropy(ref(x), torch.from_numpy(labels))
    loss.backward()
    opt.step()
    assert x.grad is not None
    return ref, float(loss.detach()), x.grad.numpy()


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_registered_algorithm_has_a_server_strategy(
        name: str, setup: tuple[SplitModel, Manifest]) -> None:
    alg = ALGORITHMS[name]
    assert alg.family in STRATEGIES
    s = _strategy(name, setup)
    assert isinstance(s, STRATEGIES[alg.family]) and s.algorithm is alg


def test_the_family_of_each_algorithm() -> None:
    want = {"heron": AuxLossStrategy, "heron-tail": AuxLossStrategy, "cse-fsl": AuxLossStrategy,
            "frozen": AuxLossStrategy, "sflv1": SplitFedStrategy, "sflv2": SplitFedStrategy,
            "fedavg": FedAvgStrategy}
    assert {n: STRATEGIES[a.family] for n, a in ALGORITHMS.items()} == want


def test_a_family_without_a_strategy_is_refused(setup: tuple[SplitModel, Manifest]) -> None:
    odd = Algorithm("odd", "gossip", "torch", "backprop", ("client",),  # type: ignore[arg-type]
                    aux_loss=False, waits_for_gradient=False, ships_server_part=False,
                    server_copy_per_device=False, uploads_smashed=False, sends_weights=True,
                    summary="")
    split, manifest = setup
    trainer = ServerTrainer(copy.deepcopy(split.server), smashed_shape=manifest.smashed_shape,
                            num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="no server strategy"):
        server_strategy("odd", trainer, split, manifest, registry={"odd": odd})


@pytest.mark.parametrize("name", ["heron", "cse-fsl", "frozen"])
def test_aux_loss_trains_the_server_part_and_sends_no_gradient(
        name: str, setup: tuple[SplitModel, Manifest]) -> None:
    s = _strategy(name, setup)
    s.begin_round(1)
    acts, labels = _batch(setup[1].smashed_shape, seed=1)
    ref, loss, _ = _reference_step(s.trainer.model, acts, labels)
    out = s.on_smashed("dev-0", 0, acts, labels)
    assert out.rejected is None and out.gradient is None
    assert out.loss == pytest.approx(loss, rel=1e-6)
    _assert_same(s.trainer.model, ref)
    again = s.on_smashed("dev-0", 0, acts, labels)  # redelivered: refused, not trained twice
    assert again.rejected == "duplicate smashed: step 0 of round 1 was already trained on"
    _assert_same(s.trainer.model, ref)
    assert s.on_smashed("dev-1", 0, acts, labels).rejected is None  # another device's step 0
    s.begin_round(2)
    assert s.on_smashed("dev-0", 0, acts, labels).rejected is None  # a new round
    assert s.initial_weights(np.ones(3, np.float32)).tolist() == [1, 1, 1]


@pytest.mark.parametrize("name", ["sflv1", "sflv2"])
def test_splitfed_answers_with_autograds_cut_layer_gradient(
        name: str, setup: tuple[SplitModel, Manifest]) -> None:
    s = _strategy(name, setup)
    s.begin_round(1)
    before = copy.deepcopy(s.trainer.model)
    acts, labels = _batch(setup[1].smashed_shape, seed=2)
    ref, loss, grad = _reference_step(before, acts, labels)
    out = s.on_smashed("dev-0", 3, acts, labels)
    assert out.rejected is None and out.gradient is not None
    assert out.loss == pytest.approx(loss, rel=1e-6) and out.reply_loss == out.loss
    assert out.gradient.dtype == np.float32
    np.testing.assert_allclose(out.gradient, grad, rtol=1e-5, atol=1e-7)
    again = s.on_smashed("dev-0", 3, acts, labels)  # redelivered: the same answer, no step
    assert again.loss is None and again.gradient is out.gradient
    if name == "sflv2":  # one server model, trained as uploads arrive
        _assert_same(s.trainer.model, ref)
    else:  # V1: the device's own copy trains; the global model waits for the round end
        _assert_same(s.trainer.model, before)
        _assert_same(s.copies["dev-0"].model, ref)  # type: ignore[attr-defined]


def test_splitfed_v1_averages_the_copies_of_devices_that_reported_by_samples(
        setup: tuple[SplitModel, Manifest]) -> None:
    s = _strategy("sflv1", setup)
    s.begin_round(1)
    before = copy.deepcopy(s.trainer.model)
    shape = setup[1].smashed_shape
    refs = {}
    for i, dev in enumerate(("dev-0", "dev-1", "dev-2")):
        acts, labels = _batch(shape, seed=10 + i)
        refs[dev] = _reference_step(before, acts, labels)[0]
        s.on_smashed(dev, 0, acts, labels)
    updates = {"dev-0": DeviceUpdate("dev-0", np.zeros(1, np.float32), 30),
               "dev-1": DeviceUpdate("dev-1", np.zeros(1, np.float32), 10)}  # dev-2 dropped
    s.end_round(updates)
    for (name, p), q0, q1 in zip(s.trainer.model.named_parameters(),
                                 refs["dev-0"].parameters(), refs["dev-1"].parameters(),
                                 strict=True):
        want = (0.75 * q0.detach().double() + 0.25 * q1.detach().double()).to(p.dtype)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6, msg=name)
    s.begin_round(2)  # the copies are per round
    assert s.copies == {}  # type: ignore[attr-defined]


def test_fedavg_ships_the_whole_model_and_refuses_smashed_data(
        setup: tuple[SplitModel, Manifest]) -> None:
    s = _strategy("fedavg", setup)
    split, manifest = s.split, s.manifest
    device = flat_from_split(split, manifest)
    theta = s.initial_weights(device)
    server = server_flat(split.server)
    assert theta.size == manifest.num_params + server.size
    np.testing.assert_array_equal(theta[manifest.num_params:], server)
    acts, labels = _batch(manifest.smashed_shape, seed=3)
    assert s.refuses_smashed and s.on_smashed("dev-0", 0, acts, labels).rejected
    # two devices' whole models, averaged by samples, become the server part the server holds
    rng = np.random.default_rng(4)
    a, b = (theta + rng.standard_normal(theta.size).astype(np.float32) for _ in range(2))
    merged = aggregate([DeviceUpdate("dev-0", a, 3), DeviceUpdate("dev-1", b, 1)], "samples")
    np.testing.assert_allclose(merged, 0.75 * a + 0.25 * b, rtol=1e-5, atol=1e-6)
    s.end_round({})
    s.load_global(merged)
    np.testing.assert_allclose(server_flat(split.server), merged[manifest.num_params:],
                               rtol=1e-6)
    np.testing.assert_allclose(flat_from_split(split, manifest), merged[:manifest.num_params],
                               rtol=1e-6)
