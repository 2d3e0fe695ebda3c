"""The activation screen (`heron bench --workload screen --sets act-rR`) and the activation
race, on a tiny cnn/conv2 split with random data: ρ² against an explicit projection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines import act_screen
from baselines.act_race import run_seed, summarise
from baselines.progress import ProgressConfig, Setting
from baselines.screen import ScreenConfig
from edge_runtime import zo_activation
from edge_runtime.protocol import TrainConfig, ZOConfig
from exporter.export import export_bundle, flat_from_split
from exporter.zoo import build_split

SHARD, BATCH = 12, 16  # shard < batch: every batch is the whole shard (BatchSampler)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Setting:
    split = build_split("cnn", (1, 8, 8), 3, cut="conv2", seed=0)
    manifest = export_bundle(split, tmp_path_factory.mktemp("tiny") / "bundle")
    for m in (split.client, split.server, split.aux):
        m.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((SHARD, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, SHARD).astype(np.int64)
    xe = rng.standard_normal((10, 1, 8, 8)).astype(np.float32)
    ye = rng.integers(0, 3, 10).astype(np.int64)
    return Setting({"dataset": "tiny"}, None, manifest, split,
                   flat_from_split(split, manifest), [], TrainConfig(batch_size=BATCH), x, y,
                   torch.from_numpy(xe), torch.from_numpy(ye), None, None)


def _explicit(st: Setting, r: int) -> dict[str, float]:
    """ρ² of each conv weight's shard gradient in the top-r right singular vectors of its
    im2col patches (numpy's im2col and SVD: nothing shared with the screen's path)."""
    convs = [m for m in st.split.client.modules() if isinstance(m, torch.nn.Conv2d)]
    seen: list[np.ndarray] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().numpy()))
             for m in convs]
    for m in convs:
        m.weight.requires_grad_(True)
        m.weight.grad = None
    xb = torch.from_numpy(st.x)
    F.cross_entropy(st.split.server(st.split.client(xb)), torch.from_numpy(st.y)).backward()
    for h in hooks:
        h.remove()
    out = {}
    for m, inp in zip(convs, seen, strict=True):
        cols = zo_activation.im2col(inp, *m.kernel_size, stride=m.stride[0],
                                    padding=m.padding[0]).astype(np.float64)
        p = np.linalg.svd(cols, full_matrices=False)[2][:r].T
        g = m.weight.grad.reshape(m.out_channels, -1).double().numpy()
        kept = g @ p @ p.T
        out[m.weight.shape[1]] = float(np.sum(kept ** 2) / np.sum(g ** 2))
        m.weight.grad = None
    return out


@pytest.mark.slow
def test_rho2_matches_an_explicit_projection(tiny: Setting) -> None:
    act = act_screen.measure(tiny, (2, 9), batches=2, seed=0)
    rows = {r["group"]: r for r in act["tensors"]}
    assert list(rows) == ["conv1.0.weight", "conv2.0.weight"]
    assert rows["conv1.0.weight"]["d"] == 16 * 9 and rows["conv2.0.weight"]["d"] == 32 * 144
    for r in (2, 9):
        want = _explicit(tiny, r)
        for name, width in (("conv1.0.weight", 1), ("conv2.0.weight", 16)):
            cell = rows[name]["r"][r]
            # float64 gradients and bases on both sides; P from float32 inputs, so the
            # shares agree to ~1e-6 (eps32 times the inputs' condition), 1e-5 as slack
            for key in ("rho2_shard_one", "rho2_shard_run", "rho2_batch_one"):
                assert cell[key] == pytest.approx(want[width], abs=1e-5), (name, r, key)
            assert cell["d_eff"] == (16 * min(r, 9) if width == 1 else 32 * r)
    # conv1's patches have 9 coordinates: at r = 9 the subspace is everything, up to P's
    # float32 orthonormality (|PᵀP - I| ~ eps32·sqrt(9) ≈ 4e-7)
    assert rows["conv1.0.weight"]["r"][9]["rho2_shard_run"] == pytest.approx(1.0, abs=1e-6)
    assert rows["conv2.0.weight"]["r"][2]["rho2_shard_run"] < 1.0
    # a group is the energy-weighted share of its tensors
    group = next(g for g in act["groups"] if g["group"] == "conv-all")
    e = [rows[n]["energy_shard"] for n in ("conv1.0.weight", "conv2.0.weight")]
    s = [rows[n]["r"][2]["rho2_shard_run"] for n in ("conv1.0.weight", "conv2.0.weight")]
    assert group["r"][2]["rho2_shard_run"] == pytest.approx((e[0] * s[0] + e[1] * s[1])
                                                           / sum(e))
    assert group["merit_random"] == pytest.approx(5000 / (16 * 9 + 32 * 144 + 2))
    assert "| conv-all |" in "\n".join(act_screen.markdown(act))


def test_act_sets_are_parsed_and_checked() -> None:
    assert ScreenConfig(run_dir="x", sets=("act-r4", "act-r16")).act_batches == 10
    with pytest.raises(ValueError, match="rank R >= 1"):
        ScreenConfig(run_dir="x", sets=("act-r0",))
    with pytest.raises(ValueError, match="act-batches"):
        ScreenConfig(run_dir="x", sets=("act-r4",), act_batches=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"train_set": "lora-last1", "aux_from_server": True}, "no --train-set"),
    ({"arms": ("heron", "guide-only")}, "heron and cse-fsl"),
    ({"act_rank": 0}, "--act-rank"),
])
def test_bad_activation_race_config_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProgressConfig(run_dir="x", heron_directions=("random", "activation"),
                       **kwargs)  # type: ignore[arg-type]


@pytest.mark.slow
def test_activation_race_pairs_its_arms_on_the_same_start(tiny: Setting, tmp_path: Path) -> None:
    cfg = ProgressConfig(run_dir=str(tmp_path), steps=4, eval_every=2, act_rank=2,
                         act_refresh=2, heron_directions=("random", "activation"))
    reps = [run_seed(tiny, cfg, s, 0.01, ZOConfig(mu=1e-3), lambda _: None) for s in (0, 1)]
    arms = reps[0]["arms"]
    assert list(arms) == ["random", "activation", "random-matched", "cse-fsl"]
    assert reps[0]["d_eff"] == 16 * 2 + 32 * 2 and reps[0]["d"] == 16 * 9 + 32 * 144
    assert arms["activation"]["lr"] == arms["random-matched"]["lr"] == pytest.approx(0.01 / 98)
    for arm in arms.values():
        assert [p["step"] for p in arm["curve"]] == [0, 2, 4]
        assert arm["curve"][0] == {"step": 0, **reps[0]["start"]}
    summary = summarise(reps)
    pairs = [(r["a"], r["b"]) for r in summary["rows"]]
    assert ("activation", "random") in pairs and ("activation", "random-matched") in pairs
    assert all(len(r["dacc"]) == 2 for r in summary["rows"])
    # the weights are restored after the race
    assert np.array_equal(flat_from_split(tiny.split, tiny.manifest), tiny.theta0)
