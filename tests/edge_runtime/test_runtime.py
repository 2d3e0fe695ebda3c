"""Device training on a real exported bundle: ZO steps lower the local loss, smashed data
leaves every k steps, and the (seed, projected) log replays the round bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT

from edge_runtime import zo
from edge_runtime.bundle import Bundle, load_bundle
from edge_runtime.manifest import SMASHED_OUTPUT
from edge_runtime.protocol import OptimizerConfig, TrainConfig, ZOConfig
from edge_runtime.runtime import LocalModel, RoundResult, step_seed, train_round
from exporter.export import export_split
from heron_data.datasets import load_dataset

SGD = OptimizerConfig(name="sgd", lr=0.01)
SHARD = 300


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
    return ds.x_train[:SHARD], ds.y_train[:SHARD]


def _shard_loss(model: LocalModel, theta: np.ndarray, shard: tuple[np.ndarray, np.ndarray]
                ) -> float:
    return model.loss(theta, *shard)


def test_bundle_and_shard_fit(model: LocalModel, bundle: Bundle,
                              shard: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = shard
    model.check_data(x, y)
    assert bundle.weights.dtype == np.float32 and bundle.weights.size == bundle.manifest.num_params
    assert np.isfinite(_shard_loss(model, bundle.weights, shard))


# --- learning -------------------------------------------------------------------------------

CONFIGS = {
    "sgd-forward-gaussian": TrainConfig(local_steps=150, optimizer=SGD),
    "adam": TrainConfig(local_steps=150, optimizer=OptimizerConfig(name="adam", lr=0.01)),
    "central": TrainConfig(local_steps=150, optimizer=SGD, zo=ZOConfig(scheme="central")),
    "sphere-q2": TrainConfig(local_steps=150, optimizer=SGD,
                             zo=ZOConfig(q=2, distribution="sphere")),
}


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_zo_training_lowers_the_local_loss(model: LocalModel, bundle: Bundle,
                                           shard: tuple[np.ndarray, np.ndarray],
                                           cfg: TrainConfig, seed: int) -> None:
    cfg = TrainConfig.from_json({**cfg.to_json(), "seed": seed})
    before = _shard_loss(model, bundle.weights, shard)
    result = train_round(model, bundle.weights, *shard, cfg, round_idx=seed, device_id="dev-0")
    after = _shard_loss(model, result.theta, shard)
    assert after < before - 0.01, (before, after)
    assert result.theta.dtype == np.float32 and result.theta.shape == bundle.weights.shape
    assert len(result.losses) == len(result.step_ms) == cfg.local_steps
    assert all(np.isfinite(result.losses))


def test_following_the_log_backwards_raises_the_loss(
        model: LocalModel, bundle: Bundle, shard: tuple[np.ndarray, np.ndarray]) -> None:
    """Control: the same steps with the sign flipped must climb, so descent is not luck."""
    cfg = CONFIGS["sgd-forward-gaussian"]
    result = train_round(model, bundle.weights, *shard, cfg, round_idx=0, device_id="dev-0")
    flipped = _replay(bundle.weights, result.seeds, -result.projected, cfg)[-1]
    before = _shard_loss(model, bundle.weights, shard)
    assert _shard_loss(model, flipped, shard) > before + 0.01
    assert _shard_loss(model, result.theta, shard) < before - 0.01


# --- the log replays the round ----------------------------------------------------------------

def _replay(theta: np.ndarray, seeds: np.ndarray, projected: np.ndarray,
            cfg: TrainConfig) -> list[np.ndarray]:
    """θ_0 … θ_h rebuilt from the (seed, projected) log alone, as a server could."""
    q, d = cfg.zo.q, theta.size
    state = zo.init_state(theta, cfg.optimizer)
    thetas = [theta]
    for s in range(len(seeds) // q):
        g = zo.reconstruct(seeds[s * q:(s + 1) * q], projected[s * q:(s + 1) * q], d, cfg.zo)
        theta, state = zo.apply(theta, g, state, cfg.optimizer)
        thetas.append(theta)
    return thetas


REPLAY = {
    "sgd-forward-q1": TrainConfig(local_steps=12, upload_every=1, optimizer=SGD),
    "sgd-central-sphere-q3": TrainConfig(
        local_steps=12, upload_every=1, optimizer=SGD,
        zo=ZOConfig(q=3, scheme="central", distribution="sphere")),
    "adam-forward-q2": TrainConfig(local_steps=12, upload_every=1, seed=5,
                                   optimizer=OptimizerConfig(name="adam", lr=0.01),
                                   zo=ZOConfig(q=2)),
}


def _nearest_rows(batch: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = batch.reshape(len(batch), -1).astype(np.float64)
    p = pool.reshape(len(pool), -1).astype(np.float64)
    dist = ((b[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    return dist.argmin(1), np.sqrt(dist.min(1))


@pytest.mark.parametrize("cfg", list(REPLAY.values()), ids=list(REPLAY))
def test_log_replays_every_step_bit_for_bit(model: LocalModel, bundle: Bundle,
                                            shard: tuple[np.ndarray, np.ndarray],
                                            cfg: TrainConfig) -> None:
    x, y = shard
    uploads: list[tuple[int, np.ndarray, np.ndarray]] = []
    result = train_round(model, bundle.weights, x, y, cfg, round_idx=3, device_id="dev-7",
                         on_smashed=lambda s, a, lab: uploads.append((s, a.copy(), lab.copy())))
    h, q = cfg.local_steps, cfg.zo.q
    assert result.seeds.dtype == np.uint64 and result.seeds.shape == (h * q,)
    assert result.projected.dtype == np.float32 and result.projected.shape == (h * q,)
    assert len(set(result.seeds.tolist())) == h * q
    thetas = _replay(bundle.weights, result.seeds, result.projected, cfg)
    assert np.array_equal(thetas[-1], result.theta)
    # Per step: the smashed data of step s is the unperturbed pass at the replayed θ_s.
    assert [s for s, _, _ in uploads] == list(range(h))
    for s, acts, labels in uploads:
        pool = model.run(thetas[s], x, y, (SMASHED_OUTPUT,))[0]
        rows, dist = _nearest_rows(acts, pool)
        assert dist.max() < 1e-4, f"step {s}: smashed data is not from θ_{s}"
        np.testing.assert_array_equal(labels, y[rows])
        assert len(set(rows.tolist())) == len(rows)
        assert result.losses[s] == pytest.approx(model.loss(thetas[s], x[rows], y[rows]),
                                                 rel=1e-5)
    assert not np.array_equal(thetas[1], thetas[0])


def test_training_is_deterministic_per_seed_round_and_device(
        model: LocalModel, bundle: Bundle, shard: tuple[np.ndarray, np.ndarray]) -> None:
    cfg = TrainConfig(local_steps=5, optimizer=SGD)

    def run(**kw: object) -> RoundResult:
        args: dict = {"round_idx": 1, "device_id": "dev-0", **kw}
        return train_round(model, bundle.weights, *shard, cfg, **args)

    a, b = run(), run()
    assert np.array_equal(a.theta, b.theta) and np.array_equal(a.seeds, b.seeds)
    assert a.losses == b.losses
    for other in (run(round_idx=2), run(device_id="dev-1")):
        assert not np.array_equal(other.seeds, a.seeds)
        assert not np.array_equal(other.theta, a.theta)


def test_start_weights_are_not_modified(model: LocalModel, bundle: Bundle,
                                        shard: tuple[np.ndarray, np.ndarray]) -> None:
    theta = bundle.weights.copy()
    train_round(model, theta, *shard, TrainConfig(local_steps=3, optimizer=SGD), round_idx=0,
                device_id="dev-0")
    assert np.array_equal(theta, bundle.weights)


# --- smashed data ---------------------------------------------------------------------------

@pytest.mark.parametrize(("steps", "every"), [(10, 3), (7, 2), (4, 5), (6, 1)])
def test_smashed_data_leaves_every_k_steps(model: LocalModel, bundle: Bundle,
                                           shard: tuple[np.ndarray, np.ndarray],
                                           steps: int, every: int) -> None:
    x, y = shard
    calls: list[tuple[int, np.ndarray, np.ndarray]] = []
    cfg = TrainConfig(local_steps=steps, upload_every=every, batch_size=32, optimizer=SGD)
    result = train_round(model, bundle.weights, x, y, cfg, round_idx=0, device_id="dev-0",
                         on_smashed=lambda s, a, lab: calls.append((s, a, lab)))
    assert [s for s, _, _ in calls] == list(range(0, steps, every))
    assert result.smashed_sent == len(calls)
    for _, acts, labels in calls:
        n = len(labels)
        assert 1 <= n <= 32
        assert acts.dtype == np.float32
        assert acts.shape == (n, *bundle.manifest.smashed_shape)
        assert labels.dtype == np.int64 and labels.shape == (n,)
        assert np.isin(labels, y).all() and np.isfinite(acts).all()


def test_no_callback_sends_nothing(model: LocalModel, bundle: Bundle,
                                   shard: tuple[np.ndarray, np.ndarray]) -> None:
    result = train_round(model, bundle.weights, *shard, TrainConfig(local_steps=4, optimizer=SGD),
                         round_idx=0, device_id="dev-0")
    assert result.smashed_sent == 0


# --- refusing bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_start_weights_are_refused(model: LocalModel, bundle: Bundle,
                                              shard: tuple[np.ndarray, np.ndarray],
                                              bad: float) -> None:
    theta = bundle.weights.copy()
    theta[17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        train_round(model, theta, *shard, TrainConfig(local_steps=2), round_idx=0,
                    device_id="dev-0")


@pytest.mark.parametrize("shape", [(5, 1, 8, 9), (5, 64), (5, 3, 8, 8), (5, 1, 8, 8, 1), (5,)])
def test_check_data_rejects_wrong_sample_shapes(model: LocalModel, shape: tuple[int, ...]
                                                ) -> None:
    with pytest.raises(ValueError, match="expects"):
        model.check_data(np.zeros(shape, np.float32), np.zeros(5, np.int64))


@pytest.mark.parametrize("label", [10, 11, 1000])
def test_check_data_rejects_labels_beyond_the_classes(model: LocalModel, label: int) -> None:
    y = np.array([0, 3, label, 9], np.int64)
    with pytest.raises(ValueError, match="10 classes"):
        model.check_data(np.zeros((4, 1, 8, 8), np.float32), y)


def test_check_data_rejects_negative_labels(model: LocalModel) -> None:
    with pytest.raises(ValueError):
        model.check_data(np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, -1, 2]))


def test_check_data_accepts_all_classes(model: LocalModel) -> None:
    model.check_data(np.zeros((10, 1, 8, 8), np.float32), np.arange(10))
    model.check_data(np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64))


# --- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    TrainConfig(),
    TrainConfig(local_steps=3, upload_every=7, batch_size=5, seed=11,
                zo=ZOConfig(mu=1e-4, q=3, scheme="central", distribution="sphere"),
                optimizer=OptimizerConfig(name="adam", lr=1e-4, beta1=0.8, weight_decay=0.1)),
    TrainConfig(optimizer=SGD),
], ids=["default", "custom", "sgd"])
def test_config_json_round_trip(cfg: TrainConfig) -> None:
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    wire = json.loads(json.dumps(cfg.to_json()))  # it travels inside RoundStart as JSON
    assert TrainConfig.from_json(wire) == cfg


def test_partial_config_takes_defaults() -> None:
    # every default but the codec's: a config without one predates the codecs, so fp32
    assert TrainConfig.from_json({"local_steps": 9}) == TrainConfig(local_steps=9,
                                                                    smashed_codec="fp32")
    assert TrainConfig.from_json({}) == TrainConfig(smashed_codec="fp32")
    assert TrainConfig.from_json({"smashed_codec": "int8"}) == TrainConfig()


def test_unknown_config_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="surprise"):
        TrainConfig.from_json({**TrainConfig().to_json(), "surprise": 1})
    # Nested unknown keys fail too (the device catches TypeError and ValueError alike).
    for section in ("zo", "optimizer"):
        obj = TrainConfig().to_json()
        obj[section] = {**obj[section], "surprise": 1}
        with pytest.raises((TypeError, ValueError)):
            TrainConfig.from_json(obj)


@pytest.mark.parametrize("obj", [
    {"local_steps": 0}, {"upload_every": 0}, {"batch_size": -1},
    {"zo": {"mu": -1.0}}, {"zo": {"scheme": "sideways"}}, {"optimizer": {"lr": 0.0}},
    {"optimizer": {"name": "lbfgs"}},
], ids=str)
def test_bad_config_values_are_rejected(obj: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig.from_json(obj)


def test_step_seeds_differ_by_run_round_device_and_step() -> None:
    base = step_seed(0, 0, "dev-0", 0)
    others = [step_seed(1, 0, "dev-0", 0), step_seed(0, 1, "dev-0", 0),
              step_seed(0, 0, "dev-1", 0), step_seed(0, 0, "dev-0", 1)]
    assert len({base, *others}) == 5
    assert step_seed(0, 0, "dev-0", 0) == base
    assert 0 <= base < 2**64


def test_frozen_round_uploads_smashed_data_and_never_updates(
        model: LocalModel, bundle: Bundle, shard: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = shard
    sent: list[int] = []
    cfg = TrainConfig(algorithm="frozen", local_steps=10, upload_every=3)
    result = train_round(model, bundle.weights.copy(), x, y, cfg, round_idx=1,
                         device_id="d", on_smashed=lambda step, a, lab: sent.append(step))
    assert np.array_equal(result.theta, bundle.weights)
    assert sent == [0, 3, 6, 9] and result.smashed_sent == 4
    assert result.seeds.size == 0 and len(result.losses) == 4


def test_unknown_algorithm_is_refused(
        model: LocalModel, bundle: Bundle, shard: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        TrainConfig(algorithm="sgd-magic")
    # a first-order baseline is a valid config, but not for the ONNX Runtime device
    x, y = shard
    with pytest.raises(ValueError, match="--torch"):
        train_round(model, bundle.weights.copy(), x, y, TrainConfig(algorithm="cse-fsl"),
                    round_idx=1, device_id="d")


def test_process_pool_is_shared_by_every_later_session_and_fixed_once_made() -> None:
    """`use_process_pool` is process-wide (ONNX Runtime's global thread pool), so this runs
    in a fresh interpreter: sessions made after it use the pool's size whatever they ask."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numpy as np, pytest
        from edge_runtime.runtime import session_options, thread_count, use_process_pool
        assert thread_count(3) == 3  # no pool yet: what is asked
        assert use_process_pool(2) == 2 and use_process_pool(2) == 2
        assert thread_count(5) == 2 and not session_options(5).use_per_session_threads
        with pytest.raises(RuntimeError, match="cannot change to 1"):
            use_process_pool(1)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
