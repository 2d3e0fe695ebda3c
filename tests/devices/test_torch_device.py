"""The first-order baseline devices' training, checked against torch autograd references."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from devices.torch_device import split_for, train_round_torch, weights_size
from edge_runtime.bundle import load_bundle
from edge_runtime.protocol import OptimizerConfig, TrainConfig
from exporter.export import export_split, load_flat_into
from server.trainer import ServerTrainer, average_modules, load_server_flat, server_flat

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    export_split("cnn", SHAPE, 10, out, cut="conv2", seed=3)
    return out


def _data(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *SHAPE), dtype=np.float32),
            rng.integers(0, 10, n).astype(np.int64))


def _cfg(alg: str, steps: int = 1) -> TrainConfig:
    # batch = shard size: the one step sees the whole shard, so order does not matter
    return TrainConfig(algorithm=alg, local_steps=steps, batch_size=16, upload_every=1,
                       optimizer=OptimizerConfig(name="sgd", lr=0.1))


def _sgd_reference(params: list[torch.nn.Parameter], loss: torch.Tensor) -> list[np.ndarray]:
    grads = torch.autograd.grad(loss, params)
    return [(p - 0.1 * g).detach().numpy().ravel() for p, g in zip(params, grads, strict=True)]


def test_cse_fsl_step_is_sgd_on_the_aux_loss(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    split = split_for(m)
    ref = split_for(m)
    x, y = _data()
    sent: list[int] = []
    res = train_round_torch(split, m, bundle.weights.copy(), x, y, _cfg("cse-fsl"),
                            round_idx=1, device_id="d", on_smashed=lambda s, a, b: sent.append(s))
    load_flat_into(ref, m, bundle.weights)
    params = [*ref.client.parameters(), *ref.aux.parameters()]
    expected = _sgd_reference(params, F.cross_entropy(ref.aux(ref.client(torch.from_numpy(x))),
                                                      torch.from_numpy(y)))
    np.testing.assert_allclose(res.theta, np.concatenate(expected), rtol=1e-5, atol=1e-6)
    assert sent == [0] and res.smashed_sent == 1


@pytest.mark.parametrize("alg", ["sflv1", "sflv2"])
def test_splitfed_client_step_equals_backprop_through_the_whole_model(
        bundle_dir: Path, alg: str) -> None:
    """The server's returned cut-layer gradient makes the client step exact end-to-end SGD."""
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    split, ref = split_for(m), split_for(m)
    x, y = _data()
    server = ServerTrainer(copy.deepcopy(split.server), optimizer="sgd", lr=0.1,
                           smashed_shape=m.smashed_shape, num_classes=10)
    ref.server.load_state_dict(split.server.state_dict())

    def exchange(step: int, act: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        loss, grad = server.train_step_grad(act, labels)
        assert grad is not None
        return grad, loss

    res = train_round_torch(split, m, bundle.weights.copy(), x, y, _cfg(alg),
                            round_idx=1, device_id="d", exchange=exchange)
    load_flat_into(ref, m, bundle.weights)
    client_params = list(ref.client.parameters())
    loss = F.cross_entropy(ref.server(ref.client(torch.from_numpy(x))), torch.from_numpy(y))
    expected_client = np.concatenate(_sgd_reference(client_params, loss))
    n_client = expected_client.size
    np.testing.assert_allclose(res.theta[:n_client], expected_client, rtol=1e-5, atol=1e-6)
    # SplitFed trains no aux head: its weights come back untouched
    np.testing.assert_array_equal(res.theta[n_client:], bundle.weights[n_client:])
    assert res.losses[0] == pytest.approx(float(loss.detach()), rel=1e-5)


def test_splitfed_needs_the_exchange(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    x, y = _data()
    with pytest.raises(ValueError, match="gradient"):
        train_round_torch(split_for(bundle.manifest), bundle.manifest, bundle.weights, x, y,
                          _cfg("sflv2"), round_idx=1, device_id="d")


def test_bad_server_gradient_is_refused(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    x, y = _data()

    def exchange(step: int, act: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        return np.full(act.shape, np.nan, np.float32), 1.0

    with pytest.raises(ValueError, match="not finite"):
        train_round_torch(split_for(bundle.manifest), bundle.manifest, bundle.weights, x, y,
                          _cfg("sflv2"), round_idx=1, device_id="d", exchange=exchange)


def test_fedavg_trains_the_whole_model(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    split, ref = split_for(m), split_for(m)
    x, y = _data()
    theta = np.concatenate([bundle.weights, server_flat(split.server)])
    assert theta.size == weights_size(split, m, "fedavg") > weights_size(split, m, "cse-fsl")
    res = train_round_torch(split, m, theta, x, y, _cfg("fedavg"), round_idx=1, device_id="d")
    load_flat_into(ref, m, bundle.weights)
    load_server_flat(ref.server, theta[m.num_params:])
    client, server = list(ref.client.parameters()), list(ref.server.parameters())
    expected = _sgd_reference([*client, *server], F.cross_entropy(
        ref.server(ref.client(torch.from_numpy(x))), torch.from_numpy(y)))
    n_client = sum(p.numel() for p in client)
    np.testing.assert_allclose(res.theta[:n_client], np.concatenate(expected[:len(client)]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.theta[m.num_params:],
                               np.concatenate(expected[len(client):]), rtol=1e-5, atol=1e-6)
    assert res.smashed_sent == 0


def test_server_gradient_matches_autograd() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    ref = copy.deepcopy(net)
    trainer = ServerTrainer(net, optimizer="sgd", lr=0.0 + 1e-9, smashed_shape=(3, 4),
                            num_classes=3)
    rng = np.random.default_rng(1)
    act = rng.standard_normal((5, 3, 4), dtype=np.float32)
    labels = rng.integers(0, 3, 5)
    loss, grad = trainer.train_step_grad(act, labels)
    a = torch.from_numpy(act).requires_grad_(True)
    expected_loss = F.cross_entropy(ref(a), torch.from_numpy(labels))
    expected_loss.backward()
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
    assert grad is not None
    np.testing.assert_allclose(grad, a.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_average_modules_is_the_weighted_mean() -> None:
    torch.manual_seed(0)
    target = torch.nn.Linear(3, 2)
    a, b = copy.deepcopy(target), copy.deepcopy(target)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(4.0)
    average_modules(target, [a, b], [2.0, 1.0])
    np.testing.assert_allclose(target.weight.detach().numpy(), np.full((2, 3), 2.0), rtol=1e-6)
    with pytest.raises(ValueError):
        average_modules(target, [a], [1.0, 2.0])


def test_server_flat_roundtrip() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    flat = server_flat(net)
    assert flat.shape == (3 * 4 + 4 + 4 * 2 + 2,)
    load_server_flat(net, flat * 2)
    np.testing.assert_allclose(server_flat(net), flat * 2)
    with pytest.raises(ValueError, match="shape"):
        load_server_flat(net, flat[:-1])
