"""Block-wise ZO: the re-run from a cached segment input equals the full graph at the
block-perturbed weights, the estimate is the full-graph reference, it is unbiased with the
full estimate's second moment, training with it lowers the local loss like full mode, the
(seed, projected) log replays the round, and the config is strict."""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from edge_runtime import blockzo, zo
from edge_runtime.bundle import Bundle, load_bundle
from edge_runtime.manifest import NCHWC_LAYOUTS, SMASHED_OUTPUT, BundleError
from edge_runtime.protocol import OptimizerConfig, TrainConfig, ZOConfig
from edge_runtime.protocol.config import DISTRIBUTIONS, SCHEMES
from edge_runtime.runtime import LocalModel, RoundResult, step_seed, train_round
from exporter.export import export_split
from heron_data.datasets import load_dataset

BLOCK = ZOConfig(perturb="block")
SGD = OptimizerConfig(name="sgd", lr=0.01)
SHARD = 300
# float32 machine epsilon: the unit every tolerance below is counted in
EPS32 = float(np.finfo(np.float32).eps)
# Forward passes through different kernels (NCHWc vs plain convolution) sum the same
# products in another order. A float32 dot product of K terms has a relative error of about
# sqrt(K)·eps (K <= 3·3·64 = 576 here, so ~24 eps per layer) and it grows with depth (4
# segments); 1e-4 (~840 eps) is ~10x that estimate, and still 1e-4 of the loss.
FORWARD_RTOL = 1e-4


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cnn") / "b"
    export_split("cnn", (1, 8, 8), 10, out)
    return out


@pytest.fixture(scope="module")
def cnn(cnn_dir: Path) -> LocalModel:
    return LocalModel(load_bundle(cnn_dir), threads=1)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> LocalModel:
    out = tmp_path_factory.mktemp("resnet") / "b"
    export_split("resnet18", (3, 8, 8), 10, out, cut="layer1")
    return LocalModel(load_bundle(out), threads=1)


@pytest.fixture(scope="module")
def resnet_plain(resnet: LocalModel) -> LocalModel:
    """The same bundle without its NCHWc variants: every segment on its plain graph."""
    return LocalModel(dataclasses.replace(resnet.bundle, nchwc_segments=()), threads=1)


def test_the_chain_uses_the_nchwc_variants_where_this_cpu_has_the_kernels(
        resnet: LocalModel, resnet_plain: LocalModel) -> None:
    assert resnet_plain.chain().nchwc == (False,) * 4
    if platform.machine().lower() in ("x86_64", "amd64"):  # ONNX Runtime's NCHWc home
        assert resnet.chain().nchwc == (True, True, True, False)
        assert resnet.chain().block_size in (8, 16)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_full_perturbation_runs_on_the_nchwc_chain_with_the_graphs_results(
        resnet: LocalModel, resnet_plain: LocalModel, cnn: LocalModel, scheme: str) -> None:
    """Where the chain has NCHWc segments it makes the full-mode passes (faster); the
    round it trains is the one-graph round: the same forward passes at the same points,
    the same directions, the same update rule.

    The trajectories themselves are not compared to a fixed tolerance: a finite difference
    divides the forward passes' float32 disagreement by μ (1e-3), and summation order is
    the CPU's. Instead, with SGD the two rounds' weights must differ by exactly
    -lr·Σ_t (ĝ_chain,t - ĝ_graph,t)·u_t: that identity holds on any CPU."""
    if not any(resnet.chain().nchwc):
        pytest.skip("this CPU's ONNX Runtime has no NCHWc kernels: full mode uses the graph")
    assert resnet.fast_chain() is resnet.chain() and resnet_plain.fast_chain() is None
    assert cnn.fast_chain() is None  # conv1 on 1-channel input: nothing to gain, the graph
    x, y = _batch(resnet.bundle, 12, seed=4)
    lr = 0.01
    cfg = TrainConfig(local_steps=4, batch_size=6, upload_every=2, seed=1,
                      zo=ZOConfig(scheme=scheme), optimizer=OptimizerConfig("sgd", lr))
    theta0 = resnet.bundle.weights
    d = theta0.size

    # 1. the same forward passes: the chain's loss at θ and θ ± μu equals the graph's
    chain = resnet.chain()
    u = zo.direction(int(zo.direction_seeds(step_seed(1, 0, "dev-0", 0), 1)[0]), d)
    for point in (theta0, theta0 + np.float32(cfg.zo.mu) * u, theta0 - np.float32(cfg.zo.mu) * u):
        xb, yb = x[:6], y[:6]
        np.testing.assert_allclose(chain.loss_from(0, xb, point, yb),
                                   resnet_plain.loss(point, xb, yb), rtol=FORWARD_RTOL)

    # 2. the same round: seeds, losses, smashed data, and the SGD identity on the weights
    got: dict[str, list[np.ndarray]] = {"chain": [], "graph": []}
    results = {}
    for name, model in (("chain", resnet), ("graph", resnet_plain)):
        results[name] = train_round(model, theta0, x, y, cfg, round_idx=0,
                                    device_id="dev-0",
                                    on_smashed=lambda _s, a, _y, n=name: got[n].append(a))
    a, b = results["chain"], results["graph"]
    np.testing.assert_array_equal(a.seeds, b.seeds)
    # losses are well conditioned: the weights differ by lr·(disagreement / μ), tiny
    np.testing.assert_allclose(a.losses, b.losses, rtol=10 * FORWARD_RTOL)
    assert len(got["chain"]) == len(got["graph"]) == 2
    np.testing.assert_allclose(got["chain"][0], got["graph"][0], rtol=FORWARD_RTOL,
                               atol=FORWARD_RTOL)
    delta = np.zeros(d, dtype=np.float64)
    scale = 1.0 / cfg.zo.q  # gaussian directions: g = 1/q Σ p_i u_i
    for seed, pa, pb in zip(a.seeds, a.projected, b.projected, strict=True):
        delta -= lr * scale * (float(pa) - float(pb)) * zo.direction(int(seed), d)
    # each of the 4 steps rounds θ (and lr·g) to float32 once in each round: 2·4 roundings
    # of at most eps/2 relative to the largest weight or step
    step_max = max(np.abs(a.theta - theta0).max(), np.abs(b.theta - theta0).max())
    tol = 2 * cfg.local_steps * EPS32 * (np.abs(theta0).max() + step_max)
    np.testing.assert_allclose(a.theta.astype(np.float64) - b.theta, delta, rtol=0, atol=tol)
    # the weights' disagreement is the forward passes' disagreement over μ, times lr: with
    # the forward passes within FORWARD_RTOL it stays far below the step itself
    assert np.abs(delta).max() < 0.05 * step_max


@pytest.fixture(scope="module")
def shard() -> tuple[np.ndarray, np.ndarray]:
    ds = load_dataset("digits")
    return ds.x_train[:SHARD], ds.y_train[:SHARD]


def _batch(bundle: Bundle, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *bundle.manifest.input_shape)).astype(np.float32),
            rng.integers(0, bundle.manifest.num_classes, n).astype(np.int64))


def _perturbed(theta: np.ndarray, block: tuple[int, int], values: np.ndarray) -> np.ndarray:
    offset, size = block
    out = theta.copy()
    out[offset:offset + size] = values
    return out


# --- the chain against the full graph ---------------------------------------------------------

@pytest.mark.parametrize("which", ["cnn", "resnet", "resnet_plain"])
@pytest.mark.parametrize("batch", [5, 16])
def test_rerun_from_the_cached_input_equals_the_full_perturbed_run(
        which: str, batch: int, request: pytest.FixtureRequest) -> None:
    model: LocalModel = request.getfixturevalue(which)
    chain = model.chain()
    x, y = _batch(model.bundle, batch, seed=batch)
    theta = model.bundle.weights
    last = len(chain) - 1
    acts = chain.prefix(theta, x, last)
    assert sorted(acts) == list(range(len(chain)))
    assert sorted(chain.prefix(theta, x, last, keep={1})) == sorted({0, 1, last})
    loss0 = chain.loss_from(last, acts[last], theta, y)
    want0, want_smashed = model.run(theta, x, y, ("loss", SMASHED_OUTPUT))
    assert loss0 == pytest.approx(float(want0), rel=FORWARD_RTOL)
    np.testing.assert_allclose(acts[last], want_smashed, rtol=FORWARD_RTOL, atol=FORWARD_RTOL)
    rng = np.random.default_rng(7)
    for j, (offset, size) in enumerate(chain.blocks):
        values = theta[offset:offset + size] + 0.05 * rng.standard_normal(size).astype(np.float32)
        got = chain.loss_from(j, acts[j], theta, y, values)
        want = model.loss(_perturbed(theta, chain.blocks[j], values), x, y)
        assert got == pytest.approx(want, rel=FORWARD_RTOL), chain.names[j]
        assert got != pytest.approx(loss0, rel=1e-7)  # the perturbation reached the loss


@pytest.mark.parametrize("which", ["cnn", "resnet", "resnet_plain"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_block_estimate_equals_the_full_graph_reference(
        which: str, scheme: str, request: pytest.FixtureRequest) -> None:
    """Perturb only block j's slice of θ and run the whole graph: same loss difference."""
    model: LocalModel = request.getfixturevalue(which)
    chain = model.chain()
    cfg = ZOConfig(perturb="block", scheme=scheme, mu=1e-2)
    x, y = _batch(model.bundle, 8, seed=3)
    theta = model.bundle.weights
    seen = set()
    sampler = zo.BlockSampler.start([size for _, size in chain.blocks])
    for seed in range(40):
        est, smashed = blockzo.estimate_step(chain, theta, x, y, seed, cfg, sampler,
                                             want_smashed=True)
        j = int(est.blocks[0])
        prob = sampler.probs()[j]
        sampler = sampler.observe(est.blocks, est.projected * est.probs, cfg)
        seen.add(j)
        offset, size = chain.blocks[j]
        u = zo.direction(int(est.seeds[0]), size, cfg.distribution)
        base = theta[offset:offset + size]
        plus = model.loss(_perturbed(theta, chain.blocks[j], base + np.float32(cfg.mu) * u), x, y)
        if scheme == "forward":
            minus, denom = model.loss(theta, x, y), cfg.mu
        else:
            minus = model.loss(_perturbed(theta, chain.blocks[j], base - np.float32(cfg.mu) * u),
                               x, y)
            denom = 2 * cfg.mu
        assert zo.seed_block(int(est.seeds[0])) == j and est.probs[0] == prob
        # the log's projection carries the importance weight 1/p_j; each of the two passes
        # may disagree with the graph's by FORWARD_RTOL, and the difference divides that by
        # the denominator (a wrong block or direction would be off by the whole value)
        tol = FORWARD_RTOL * (abs(plus) + abs(minus)) / denom
        assert float(est.projected[0]) * prob == pytest.approx((plus - minus) / denom, abs=tol)
        want = np.zeros(theta.size, np.float32)
        want[offset:offset + size] = est.projected[0] * u
        np.testing.assert_allclose(est.grad, want, rtol=1e-5, atol=1e-8)
        assert smashed is not None
        np.testing.assert_allclose(smashed, model.run(theta, x, y, (SMASHED_OUTPUT,))[0],
                                   rtol=FORWARD_RTOL, atol=FORWARD_RTOL)
    assert seen == set(range(len(chain)))  # every block was drawn


# --- the estimator ------------------------------------------------------------------------------

SIZES = [5, 20, 75, 0]  # a parameter-free block too
BLOCKS = [(0, 5), (5, 20), (25, 75), (100, 0)]


def test_the_sampler_starts_uniform_and_then_follows_each_blocks_gradient_energy() -> None:
    cfg = ZOConfig(perturb="block")
    start = zo.BlockSampler.start(SIZES)
    np.testing.assert_allclose(start.probs(), [1 / 3, 1 / 3, 1 / 3, 0])
    # blocks not drawn yet count as the mean of those drawn
    one = start.observe([2], [3.0], cfg)
    np.testing.assert_allclose(one.probs(), [1 / 3, 1 / 3, 1 / 3, 0])
    seen = one.observe([0, 1], [1.0, 2.0], cfg)
    assert seen.energy[:3] == (1.0, 4.0, 9.0)
    share = np.array([1.0, 4.0, 9.0, 0.0]) / 14
    floor = np.array([1, 1, 1, 0]) / 3
    np.testing.assert_allclose(seen.probs(), (1 - zo.BLOCK_FLOOR) * share + zo.BLOCK_FLOOR * floor)
    again = seen.observe([2], [1.0], cfg)  # a moving average of the squared projections
    assert again.energy[2] == pytest.approx((1 - zo.BLOCK_MEMORY) * 9 + zo.BLOCK_MEMORY * 1)
    sphere = start.observe([1], [2.0], ZOConfig(perturb="block", distribution="sphere"))
    assert sphere.energy[1] == 4.0 * SIZES[1]  # a unit direction sees ‖∇_j‖² / d_j
    draws = np.asarray([seen.draw(s) for s in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, seen.probs(),
                               atol=0.015)
    assert seen.draw(123) == seen.draw(123)
    with pytest.raises(ValueError):
        zo.BlockSampler.start([0, 0])


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_block_estimate_is_unbiased_for_any_sampler_state(distribution: str) -> None:
    """On a linear loss the finite difference is exact, so the mean can be checked tightly."""
    g = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    theta = np.zeros(100, np.float32)
    cfg = ZOConfig(perturb="block", distribution=distribution, mu=1.0)

    def loss_from(j: int, values: np.ndarray) -> float:
        offset, size = BLOCKS[j]
        return float(np.dot(g[offset:offset + size], values.astype(np.float64)))

    skewed = zo.BlockSampler.start(SIZES).observe([0, 1, 2], [1.0, 2.0, 4.0], cfg)
    for sampler in (zo.BlockSampler.start(SIZES), skewed):
        ests = [zo.estimate_blocks(loss_from, theta, BLOCKS, seed, cfg, sampler, 0.0).grad
                for seed in range(8000)]
        mean = np.asarray(ests, dtype=np.float64).mean(0)
        assert np.dot(mean, g) / (np.linalg.norm(mean) * np.linalg.norm(g)) > 0.95
        assert np.linalg.norm(mean) == pytest.approx(np.linalg.norm(g), rel=0.1)


def test_estimate_and_reconstruct_refuse_the_wrong_mode() -> None:
    theta = np.zeros(100, np.float32)
    sampler = zo.BlockSampler.start(SIZES)
    with pytest.raises(ValueError, match="estimate_blocks"):
        zo.estimate(lambda t: 0.0, theta, 1, BLOCK, 0.0)
    with pytest.raises(ValueError, match="perturb='block'"):
        zo.estimate_blocks(lambda j, v: 0.0, theta, BLOCKS, 1, ZOConfig(), sampler, 0.0)
    with pytest.raises(ValueError, match="loss0"):
        zo.estimate_blocks(lambda j, v: 0.0, theta, BLOCKS, 1, BLOCK, sampler)
    with pytest.raises(ValueError, match="cover"):
        zo.estimate_blocks(lambda j, v: 0.0, theta[:50], BLOCKS, 1, BLOCK, sampler, 0.0)
    with pytest.raises(ValueError, match="segments"):
        zo.reconstruct(np.zeros(1, np.uint64), np.zeros(1, np.float32), 100, BLOCK)


# --- training ------------------------------------------------------------------------------------

def test_block_training_lowers_the_local_loss_like_full_mode(
        cnn: LocalModel, shard: tuple[np.ndarray, np.ndarray]) -> None:
    before = cnn.loss(cnn.bundle.weights, *shard)
    drops: dict[str, list[float]] = {"full": [], "block": []}
    for perturb in drops:
        for seed in range(3):
            cfg = TrainConfig(local_steps=150, seed=seed, zo=ZOConfig(perturb=perturb),
                                  optimizer=OptimizerConfig(name="adam", lr=0.01))
            result = train_round(cnn, cnn.bundle.weights, *shard, cfg, round_idx=seed,
                                 device_id="dev-0")
            drops[perturb].append(before - cnn.loss(result.theta, *shard))
    assert min(drops["block"]) > 0.01, drops
    assert np.mean(drops["block"]) > 0.5 * np.mean(drops["full"]), drops


@pytest.mark.parametrize("scheme", SCHEMES)
def test_block_log_replays_the_round_bit_for_bit(
        cnn: LocalModel, shard: tuple[np.ndarray, np.ndarray], scheme: str) -> None:
    """θ and every upload rebuilt from (seed, projected) and the manifest's segments."""
    x, y = shard
    cfg = TrainConfig(local_steps=12, upload_every=3, seed=4,
                      zo=ZOConfig(perturb="block", scheme=scheme, q=2))
    uploads: list[tuple[int, np.ndarray]] = []
    result = train_round(cnn, cnn.bundle.weights, x, y, cfg, round_idx=2, device_id="dev-3",
                         on_smashed=lambda s, a, lab: uploads.append((s, a.copy())))
    h, q = cfg.local_steps, cfg.zo.q
    assert result.seeds.shape == result.projected.shape == result.blocks.shape == (h * q,)
    blocks = [(s.offset, s.size) for s in cnn.bundle.manifest.segments]
    assert [zo.seed_block(int(s)) for s in result.seeds] == result.blocks.tolist()
    theta, state = cnn.bundle.weights, zo.init_state(cnn.bundle.weights, cfg.optimizer)
    thetas = [theta]
    for s in range(h):
        g = zo.reconstruct(result.seeds[s * q:(s + 1) * q], result.projected[s * q:(s + 1) * q],
                           theta.size, cfg.zo, blocks)
        theta, state = zo.apply(theta, g, state, cfg.optimizer)
        thetas.append(theta)
    assert np.array_equal(thetas[-1], result.theta)
    assert [s for s, _ in uploads] == [0, 3, 6, 9] and result.smashed_sent == 4
    for s, acts in uploads:  # the unperturbed pass at θ_s, as in full mode
        pool = cnn.run(thetas[s], x, y, (SMASHED_OUTPUT,))[0].reshape(len(x), -1)
        dist = ((acts.reshape(len(acts), 1, -1) - pool[None]) ** 2).sum(-1).min(1)
        assert dist.max() < 1e-8
    step0 = step_seed(cfg.seed, 2, "dev-3", 0)
    assert [zo.tag_seed(int(s), int(j)) for s, j in zip(
        zo.direction_seeds(step0, q), result.blocks[:q], strict=True)] == result.seeds[:q].tolist()


def test_the_block_sampler_carries_over_to_the_next_round(
        cnn: LocalModel, shard: tuple[np.ndarray, np.ndarray]) -> None:
    cfg = TrainConfig(local_steps=20, zo=BLOCK)
    first = train_round(cnn, cnn.bundle.weights, *shard, cfg, round_idx=0, device_id="d")
    carried = first.block_sampler
    assert carried is not None and not np.isnan(carried.energy).any()
    assert not np.allclose(carried.probs(), [0.5, 0.5])  # it learnt the blocks' energies

    def second(sampler: zo.BlockSampler | None) -> RoundResult:
        return train_round(cnn, first.theta, *shard, cfg, round_idx=1, device_id="d",
                           block_sampler=sampler)

    a, b, fresh = second(carried), second(carried), second(None)
    assert np.array_equal(a.theta, b.theta) and a.blocks.tolist() == b.blocks.tolist()
    assert a.blocks.tolist() != fresh.blocks.tolist()
    # a sampler for another bundle's segments is not used
    other = zo.BlockSampler.start([1, 2, 3])
    assert second(other).blocks.tolist() == fresh.blocks.tolist()


def test_block_indices_ride_in_the_top_byte_of_the_logged_seed() -> None:
    seed = 0xFFFF_FFFF_FFFF_FFFF
    for j in (0, 3, zo.MAX_BLOCKS - 1):
        tagged = zo.tag_seed(seed, j)
        assert zo.seed_block(tagged) == j and tagged >> 56 == j
        assert tagged & (2**56 - 1) == seed & (2**56 - 1)
    with pytest.raises(ValueError, match="at most"):
        zo.tag_seed(1, zo.MAX_BLOCKS)


def test_block_mode_on_a_bundle_without_segments_says_what_to_do(
        cnn_dir: Path, shard: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    out = tmp_path / "old"
    shutil.copytree(cnn_dir, out)
    obj = json.loads((out / "manifest.json").read_text())
    for spec in obj.pop("segments"):
        for file in filter(None, (spec["file"], spec.get("nchwc_file"))):
            del obj["files"][file]
    (out / "manifest.json").write_text(json.dumps(obj))
    old = LocalModel(load_bundle(out), threads=1)
    cfg = TrainConfig(local_steps=2, zo=BLOCK)
    with pytest.raises(BundleError, match="segments.*help"):
        train_round(old, old.bundle.weights, *shard, cfg, round_idx=0, device_id="d")
    full = train_round(old, old.bundle.weights, *shard, TrainConfig(local_steps=2),
                       round_idx=0, device_id="d")
    assert full.blocks.size == 0


def test_block_mode_runs_without_torch(cnn_dir: Path, no_torch_env: dict) -> None:
    code = ("import numpy as np, sys\n"
            "from edge_runtime.bundle import load_bundle\n"
            "from edge_runtime.protocol import TrainConfig, ZOConfig\n"
            "from edge_runtime.runtime import LocalModel, train_round\n"
            f"b = load_bundle({str(cnn_dir)!r})\n"
            "x = np.zeros((8, 1, 8, 8), np.float32); y = np.arange(8) % 10\n"
            "r = train_round(LocalModel(b, 1), b.weights, x, y, TrainConfig(local_steps=3, "
            "zo=ZOConfig(perturb='block')), round_idx=0, device_id='d')\n"
            "assert 'torch' not in sys.modules and r.blocks.size == 3\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=no_torch_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- config -------------------------------------------------------------------------------------

def test_perturb_travels_in_the_round_config_and_full_stays_off_the_wire() -> None:
    cfg = TrainConfig(zo=ZOConfig(perturb="block", q=2))
    wire = json.loads(json.dumps(cfg.to_json()))
    assert wire["zo"]["perturb"] == "block"
    assert TrainConfig.from_json(wire) == cfg
    default = TrainConfig().to_json()
    assert "perturb" not in default["zo"]  # the default stays off the wire
    assert TrainConfig.from_json(default) == TrainConfig()


@pytest.mark.parametrize("zo_obj", [{"perturb": "layer"}, {"perturb": ""}, {"perturb": None}],
                         ids=str)
def test_bad_perturb_values_are_rejected(zo_obj: dict) -> None:
    with pytest.raises(ValueError, match="perturb"):
        TrainConfig.from_json({"zo": zo_obj})


def test_unknown_zo_keys_are_still_rejected() -> None:
    with pytest.raises(TypeError):
        TrainConfig.from_json({"zo": {"perturbation": "block"}})


# --- NCHWc variants that cannot be used fall back to the plain graph ---------------------------

def _with_variant(model: LocalModel, i: int, variant: bytes | None) -> LocalModel:
    swapped = list(model.bundle.nchwc_segments)
    swapped[i] = variant
    return LocalModel(dataclasses.replace(model.bundle, nchwc_segments=tuple(swapped)),
                      threads=1)


def _relabelled(variant: bytes, layout: str | None) -> bytes:
    """The variant with every filter's layout metadata set to `layout` (None: dropped)."""
    import onnx
    from onnx import helper

    proto = onnx.load_from_string(variant)
    layouts = json.loads({p.key: p.value for p in proto.metadata_props}[NCHWC_LAYOUTS])
    del proto.metadata_props[:]
    if layout is not None:
        helper.set_model_props(proto, {NCHWC_LAYOUTS: json.dumps(dict.fromkeys(layouts,
                                                                               layout))})
    return proto.SerializeToString()


@pytest.mark.parametrize("bad", ["garbage", "other-segment", "wrong-layout", "no-layouts"])
def test_an_unusable_nchwc_variant_leaves_its_segment_on_the_plain_graph(
        resnet: LocalModel, bad: str) -> None:
    variants = resnet.bundle.nchwc_segments
    assert variants[1] is not None and variants[2] is not None
    replacement = {"garbage": b"not onnx", "other-segment": variants[2],
                   "wrong-layout": _relabelled(variants[1], "OIHWBo"),
                   "no-layouts": _relabelled(variants[1], None)}[bad]
    model = _with_variant(resnet, 1, replacement)
    chain = model.chain()
    assert chain.nchwc[1] is False
    x, y = _batch(model.bundle, 4, seed=2)
    theta = model.bundle.weights
    acts = chain.prefix(theta, x, 3)
    assert chain.loss_from(1, acts[1], theta, y) == pytest.approx(model.loss(theta, x, y),
                                                                  rel=1e-5)
