"""`edge_runtime.replay`: a device's round rebuilt from its (seed, projected) log equals the
weights the device trained, bit for bit, with full and block-wise perturbation; the log
check refuses what the round's config cannot make."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_runtime import zo
from edge_runtime.bundle import Bundle, load_bundle
from edge_runtime.protocol import OptimizerConfig, TrainConfig, ZOConfig
from edge_runtime.replay import check_log, replay_round, weights_hash
from edge_runtime.runtime import LocalModel, step_seed, train_round
from exporter.export import export_split
from heron_data.datasets import load_dataset

ADAM = OptimizerConfig(name="adam", lr=0.01)
CONFIGS = {
    "adam-forward-full": TrainConfig(local_steps=8, optimizer=ADAM, device_sync="replay"),
    "sgd-central-q3-wd": TrainConfig(
        local_steps=6, seed=3, device_sync="replay",
        optimizer=OptimizerConfig(name="sgd", lr=0.01, weight_decay=1e-3),
        zo=ZOConfig(q=3, scheme="central")),
    "adam-block-q2": TrainConfig(local_steps=8, optimizer=ADAM, device_sync="replay",
                                 zo=ZOConfig(q=2, perturb="block")),
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = tmp_path_factory.mktemp("bundle") / "b"
    export_split("cnn", (1, 8, 8), 10, out)
    return load_bundle(out)


@pytest.fixture(scope="module")
def model(bundle: Bundle) -> LocalModel:
    return LocalModel(bundle, threads=1)


@pytest.fixture(scope="module")
def shard() -> tuple[np.ndarray, np.ndarray]:
    ds = load_dataset("digits")
    return ds.x_train[:200], ds.y_train[:200]


def _blocks(bundle: Bundle) -> tuple[tuple[int, int], ...]:
    return tuple((s.offset, s.size) for s in bundle.manifest.segments)


def _step_seeds(cfg: TrainConfig, round_idx: int, device: str) -> list[int]:
    return [step_seed(cfg.seed, round_idx, device, s) for s in range(cfg.local_steps)]


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_replay_equals_the_devices_weights_bit_for_bit(
        model: LocalModel, bundle: Bundle, shard: tuple[np.ndarray, np.ndarray],
        cfg: TrainConfig) -> None:
    # Bit for bit, no tolerance: replay calls the very zo.reconstruct and zo.apply the
    # device stepped with, on the same float32 inputs in the same order.
    result = train_round(model, bundle.weights, *shard, cfg, round_idx=2, device_id="dev-1")
    blocks = _blocks(bundle)
    assert check_log(result.seeds, result.projected, _step_seeds(cfg, 2, "dev-1"), cfg,
                     len(blocks)) is None
    theta = replay_round(bundle.weights, result.seeds, result.projected, cfg,
                         blocks if cfg.zo.perturb == "block" else None)
    assert theta.dtype == np.float32
    np.testing.assert_array_equal(theta, result.theta)
    assert weights_hash(theta) == weights_hash(result.theta)
    assert not np.array_equal(theta, bundle.weights)


def test_the_hash_catches_one_changed_projection(
        model: LocalModel, bundle: Bundle, shard: tuple[np.ndarray, np.ndarray]) -> None:
    cfg = CONFIGS["adam-forward-full"]
    result = train_round(model, bundle.weights, *shard, cfg, round_idx=0, device_id="dev-0")
    tampered = result.projected.copy()
    tampered[3] = np.nextafter(tampered[3], np.float32(np.inf))  # one ulp
    theta = replay_round(bundle.weights, result.seeds, tampered, cfg)
    assert weights_hash(theta) != weights_hash(result.theta)


def test_weights_hash_is_16_bytes_of_sha256_over_little_endian_float32() -> None:
    import hashlib

    theta = np.arange(5, dtype=np.float32)
    assert weights_hash(theta) == hashlib.sha256(theta.astype("<f4").tobytes()).hexdigest()[:32]
    assert weights_hash(theta.astype(">f4")) == weights_hash(theta)  # byte order is fixed
    assert weights_hash(theta + np.float32(1e-6)) != weights_hash(theta)


def test_check_log_refuses_what_the_config_cannot_make() -> None:
    cfg = TrainConfig(local_steps=3, device_sync="replay", zo=ZOConfig(q=2))
    steps = _step_seeds(cfg, 1, "dev-0")
    seeds = np.concatenate([zo.direction_seeds(s, 2) for s in steps])
    proj = np.ones(6, np.float32)
    assert check_log(seeds, proj, steps, cfg, 0) is None
    assert "3 steps x 2 directions = 6" in check_log(seeds[:4], proj[:4], steps, cfg, 0)
    other = _step_seeds(cfg, 1, "dev-1")  # another device's (or round's) seeds
    assert "seed 0 (step 0)" in check_log(seeds, proj, other, cfg, 0)
    swapped = seeds.copy()
    swapped[[2, 4]] = swapped[[4, 2]]
    assert "seed 2 (step 1)" in check_log(swapped, proj, steps, cfg, 0)
    block = dataclasses.replace(cfg, zo=ZOConfig(q=2, perturb="block"))
    tagged = np.asarray([zo.tag_seed(int(s), 1) for s in seeds], dtype=np.uint64)
    assert check_log(tagged, proj, steps, block, 2) is None
    assert "names block 1 of 1" in check_log(tagged, proj, steps, block, 1)


def test_replay_of_a_log_that_overflows_returns_non_finite_weights() -> None:
    """A hostile log may make inf; replay hands it back quietly for the update checks."""
    cfg = TrainConfig(local_steps=1, device_sync="replay",
                      optimizer=OptimizerConfig(name="sgd", lr=1.0))
    seeds = zo.direction_seeds(step_seed(0, 1, "d", 0), 1)
    theta = replay_round(np.zeros(100, np.float32), seeds, np.asarray([3e38], np.float32), cfg)
    assert not np.all(np.isfinite(theta))
