"""Server FO step against a plain torch loop; upload checks; evaluation by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporter.zoo import SplitModel, build_split
from server.trainer import Evaluation, ServerTrainer, evaluate

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def split() -> SplitModel:
    return build_split("cnn", (1, 8, 8), NUM_CLASSES, seed=0)


def _trainer(server: nn.Module, shape: tuple[int, ...], lr: float = 1e-3) -> ServerTrainer:
    return ServerTrainer(copy.deepcopy(server), optimizer="adam", lr=lr, smashed_shape=shape,
                         num_classes=NUM_CLASSES)


def _batch(shape: tuple[int, ...], n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((n, *shape)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    return acts, labels


# --- check_batch ----------------------------------------------------------------------------

SHAPE = (4, 3, 3)


@pytest.fixture
def checker() -> ServerTrainer:
    return ServerTrainer(nn.Sequential(nn.Flatten(), nn.Linear(36, NUM_CLASSES)),
                         smashed_shape=SHAPE, num_classes=NUM_CLASSES)


def test_good_batch_is_accepted(checker: ServerTrainer) -> None:
    acts, labels = _batch(SHAPE)
    assert checker.check_batch(acts, labels) is None
    assert checker.check_batch(acts[:1], labels[:1].astype(np.int32)) is None
    assert checker.check_batch(acts, np.arange(16, dtype=np.uint8) % NUM_CLASSES) is None


def _bad(what: str) -> tuple[np.ndarray, np.ndarray]:
    acts, labels = _batch(SHAPE)
    if what == "float64":
        return acts.astype(np.float64), labels
    if what == "float16":
        return acts.astype(np.float16), labels
    if what == "sample-shape":
        return acts.reshape(16, 3, 4, 3), labels
    if what == "flat":
        return acts.reshape(16, 36), labels
    if what == "extra-axis":
        return acts[..., None], labels
    if what == "scalar":
        return np.ones((), np.float32), labels
    if what == "fewer-labels":
        return acts, labels[:-1]
    if what == "more-labels":
        return acts, np.append(labels, 0)
    if what == "label-matrix":
        return acts, labels[:, None]
    if what == "float-labels":
        return acts, labels.astype(np.float32)
    if what == "label-too-big":
        labels[3] = NUM_CLASSES
        return acts, labels
    if what == "label-negative":
        labels[0] = -1
        return acts, labels
    if what in ("nan", "inf", "-inf"):
        acts[2, 1, 0, 0] = float(what)
        return acts, labels
    if what == "huge":
        acts[5, 0, 0, 0] = 1e7
        return acts, labels
    if what == "huge-negative":
        acts[5, 0, 0, 0] = -2e6
        return acts, labels
    if what == "empty":
        return acts[:0], labels[:0]
    raise AssertionError(what)


BAD = {
    "float64": "dtype", "float16": "dtype",
    "sample-shape": "shape", "flat": "shape", "extra-axis": "shape", "scalar": "shape",
    "fewer-labels": "labels", "more-labels": "labels", "label-matrix": "labels",
    "float-labels": "labels", "label-too-big": "labels outside", "label-negative": "labels outside",
    "nan": "NaN", "inf": "NaN or Inf", "-inf": "NaN or Inf",
    "huge": "exceed", "huge-negative": "exceed", "empty": "empty",
}


@pytest.mark.parametrize(("what", "says"), list(BAD.items()), ids=list(BAD))
def test_bad_batch_is_refused_with_a_reason(checker: ServerTrainer, what: str, says: str) -> None:
    why = checker.check_batch(*_bad(what))
    assert why is not None and says in why


def test_huge_value_bound_is_configurable(checker: ServerTrainer) -> None:
    acts, labels = _batch(SHAPE)
    acts[0, 0, 0, 0] = 50.0
    assert checker.check_batch(acts, labels) is None
    assert checker.check_batch(acts, labels, max_abs=10.0) is not None


# --- train_step -----------------------------------------------------------------------------

def test_train_step_matches_a_plain_torch_loop(split: SplitModel) -> None:
    shape = split.smashed_shape
    trainer = _trainer(split.server, shape)
    ref = copy.deepcopy(split.server)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    for step in range(5):
        acts, labels = _batch(shape, seed=step)
        ref.train()
        opt.zero_grad()
        loss = F.cross_entropy(ref(torch.from_numpy(acts)), torch.from_numpy(labels))
        loss.backward()
        opt.step()
        want = float(loss.detach())
        got = trainer.train_step(acts, labels)
        if step == 0:
            assert got == want  # same init, same forward: identical first loss
        assert got == pytest.approx(want, rel=1e-5)
    assert trainer.steps == 5
    for p, q in zip(trainer.model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_train_step_lowers_the_loss_on_a_fixed_batch(split: SplitModel) -> None:
    trainer = _trainer(split.server, split.smashed_shape, lr=1e-3)
    acts, labels = _batch(split.smashed_shape, n=32)
    losses = [trainer.train_step(acts, labels) for _ in range(50)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert min(losses[40:]) < min(losses[:10])


def test_train_step_accepts_int32_labels_and_leaves_inputs_alone(split: SplitModel) -> None:
    trainer = _trainer(split.server, split.smashed_shape)
    acts, labels = _batch(split.smashed_shape)
    a0, l0 = acts.copy(), labels.astype(np.int32)
    assert np.isfinite(trainer.train_step(acts, l0))
    assert np.array_equal(acts, a0) and l0.dtype == np.int32


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        ServerTrainer(nn.Linear(2, 2), optimizer="lbfgs", smashed_shape=(2,), num_classes=2)


def test_sgd_optimizer_trains_too(split: SplitModel) -> None:
    trainer = ServerTrainer(copy.deepcopy(split.server), optimizer="sgd", lr=1e-2,
                            smashed_shape=split.smashed_shape, num_classes=NUM_CLASSES)
    acts, labels = _batch(split.smashed_shape, n=32)
    losses = [trainer.train_step(acts, labels) for _ in range(30)]
    assert losses[-1] < losses[0]


# --- evaluate -------------------------------------------------------------------------------

def test_evaluate_by_hand_with_identity_models() -> None:
    logits = np.array([[2.0, 0.0, 0.0],   # predicts 0
                       [0.0, 3.0, 1.0],   # predicts 1
                       [0.0, 1.0, 5.0],   # predicts 2
                       [4.0, 0.0, 1.0]],  # predicts 0
                      np.float32)
    y = np.array([0, 1, 0, 0], np.int64)  # third is wrong: 3 of 4 correct
    ev = evaluate(nn.Identity(), nn.Identity(), logits, y)
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    assert isinstance(ev, Evaluation)
    assert ev.accuracy == 0.75 and ev.samples == 4
    assert ev.loss == pytest.approx(float(-logp[np.arange(4), y].mean()), rel=1e-6)


@pytest.mark.parametrize("batch_size", [512, 7, 1])
def test_evaluate_matches_torch_on_the_split_model(split: SplitModel, batch_size: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, 50).astype(np.int64)
    client, server = copy.deepcopy(split.client), copy.deepcopy(split.server)
    ev = evaluate(client, server, x, y, batch_size=batch_size)
    with torch.no_grad():
        logits = split.server.eval()(split.client.eval()(torch.from_numpy(x)))
    acc = float((logits.argmax(1).numpy() == y).mean())
    assert ev.samples == 50
    assert ev.accuracy == pytest.approx(acc, abs=1e-12)
    assert ev.loss == pytest.approx(float(F.cross_entropy(logits, torch.from_numpy(y))), rel=1e-5)
    for p, q in zip(server.parameters(), split.server.parameters(), strict=True):
        assert torch.equal(p, q)  # evaluation does not train
