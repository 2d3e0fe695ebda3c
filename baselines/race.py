"""The progress bench on a trained subset of the device (issue 15, step 2: the ZO race).

``heron bench --workload progress --train-set lora-lastN`` (with ``--aux-from-server``):
every arm trains only the client LoRA of the last N device layers; the layers below are
fixed, so their outputs are cached once per run for the shard, the guide set and the
test set, and every forward starts there (ONNX Runtime's segment chain for ZO, torch for
backprop and evaluation). The aux head is the server's copy and never moves, so the
device's loss is exactly the evaluated loss at minilm/layer5. Arms:

- ``heron-random``: q isotropic directions over the set (today's ZO, d = |S|);
- ``heron-guided``: directions in the span of the server's guide basis U (rank
  ``guide_rank``, recomputed every ``guide_every`` steps at the arm's current weights from
  ``guide_size`` held-out rows, `baselines.guide`); the device's usual two forwards;
- ``noise``: the matched-noise control. The guided arm's own bases and the sizes of its
  measured finite differences, step by step, with a random sign instead of the measured
  one: the same subspaces and step lengths, no information from the device's data;
- ``cse-fsl``: backprop of the same loss on the shard (Adam, the ceiling);
- ``guide-only``: backprop on the guide set alone (what the server's guide data is worth
  without any device).

Batches are paired: every arm draws the shard's batches from the same sampler seeds as a
device round does. With ``seeds``, the whole race repeats per seed (batch order, ZO
directions, guide draw) and `race_markdown` reports paired differences with 95%
t-intervals.
"""

from __future__ import annotations

import json
import math
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from baselines import guide
from baselines.minilm_tail import prefix, tail_grads, tail_logits
from edge_runtime import zo, zo_guided
from edge_runtime.blockzo import SegmentChain
from edge_runtime.data import BatchSampler
from edge_runtime.protocol import OptimizerConfig
from edge_runtime.runtime import session_options, step_seed

if TYPE_CHECKING:
    from baselines.progress import ProgressConfig, Setting

NOISE_KEY = 0x6E6F697365  # "noise": the control's sign stream
_SUBSET = re.compile(r"^lora-(all|last(\d+))$")
# two-sided 95% t quantiles, df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def check_train_set(name: str) -> None:
    if not _SUBSET.match(name):
        raise ValueError(f"--train-set must be lora-all or lora-lastN, got {name!r}")


@dataclass
class Subset:
    """The trained slice θ[lo:hi] (client segments start..), and the cached inputs."""

    start: int
    lo: int
    hi: int
    chain: SegmentChain
    h_ort: np.ndarray  # the shard's inputs to segment `start` (ONNX Runtime layout)
    h: torch.Tensor  # the same in torch (hidden states; token ids if start is -1)
    mask: torch.Tensor
    he: torch.Tensor  # test set
    mask_e: torch.Tensor
    hg: torch.Tensor | None  # guide set
    mask_g: torch.Tensor | None
    yg: np.ndarray | None


def open_subset(st: Setting, name: str, threads: int, gx: np.ndarray | None,
                gy: np.ndarray | None) -> Subset:
    check_train_set(name)
    m = _SUBSET.match(name)
    assert m is not None
    segs = [s for s in st.manifest.segments
            if all(p.startswith("client.") for p in s.params)]
    if not segs:
        raise ValueError("--train-set needs a bundle with segments (one per client layer)")
    n = len(segs) if m.group(1) == "all" else int(m.group(2))
    if not 1 <= n <= len(segs):
        raise ValueError(f"--train-set {name}: the device has {len(segs)} layers")
    start = len(segs) - n
    lo, hi = segs[start].offset, segs[-1].offset + segs[-1].size
    chain = SegmentChain(st.bundle, session_options(threads))
    h_ort = chain.prefix(st.theta0, st.x, start, {start})[start]
    xe = st.xe.numpy()
    mk = (lambda a: torch.from_numpy(np.ascontiguousarray(a[:, 1])))  # noqa: E731
    return Subset(start, lo, hi, chain, h_ort, prefix(st.split, st.x, start), mk(st.x),
                  prefix(st.split, xe, start), mk(xe),
                  None if gx is None else prefix(st.split, gx, start),
                  None if gx is None else mk(gx), gy)


def evaluate(st: Setting, sub: Subset, theta: np.ndarray) -> dict[str, float]:
    """Test accuracy and loss of server(client(x)) from the cached test inputs; the aux
    head never moves in these arms (the server's copy), so its loss is the same."""
    guide.load_device(st.split, st.manifest, theta)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(st.ye), 128):
            logits = tail_logits(st.split, sub.start, sub.he[i:i + 128], sub.mask_e[i:i + 128])
            correct += int((logits.argmax(1) == st.ye[i:i + 128]).sum())
            loss += float(F.cross_entropy(logits, st.ye[i:i + 128], reduction="sum"))
    n = len(st.ye)
    return {"test_accuracy": correct / n, "test_loss": loss / n, "aux_test_loss": loss / n}


def _set_tensors(st: Setting, sub: Subset) -> list[tuple[Any, torch.nn.Parameter]]:
    owned = guide.manifest_params(st.split, st.manifest)
    return [(spec, p) for spec, p in zip(st.manifest.params, owned, strict=True)
            if p is not None and sub.lo <= spec.offset < sub.hi]


def subset_basis(st: Setting, sub: Subset, theta: np.ndarray, k: int, batch: int) -> np.ndarray:
    """The guide basis over θ[lo:hi]: top-k directions of the full loss's gradients on the
    guide set's batches, through the server's torch copy (`baselines.guide`)."""
    assert sub.hg is not None and sub.mask_g is not None and sub.yg is not None
    if len(sub.yg) < k * batch:
        raise ValueError(f"--guide-size {len(sub.yg)} gives fewer guide batches of {batch} "
                         f"than --guide-rank {k}; help: at least {k * batch} rows")
    grads = tail_grads(st.split, st.manifest, theta, sub.start, sub.hg, sub.mask_g, sub.yg,
                       sub.lo, sub.hi, batch)
    return zo_guided.orthonormal_basis(grads, k)


@dataclass
class GuidedLog:
    """What the noise control replays from the guided arm: bases by step, |s| by step."""

    bases: dict[int, np.ndarray]
    sizes: dict[tuple[int, int], np.ndarray]


def zo_round(st: Setting, sub: Subset, theta: np.ndarray, cfg: Any, *, round_idx: int,
             device: str, mode: str, step0: int, guide_fn: Callable[[np.ndarray], np.ndarray],
             guide_every: int, alpha: float, log: GuidedLog, basis: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray | None, list[float]]:
    """One round of `cfg.local_steps` ZO steps on θ[lo:hi] (mode random | guided | noise).

    The same batch sampler and step seeds as `edge_runtime.runtime.train_round`."""
    sampler = BatchSampler(len(st.y), cfg.batch_size, np.random.default_rng(
        [cfg.seed, round_idx, zlib.crc32(device.encode())]))
    state = zo.init_state(theta[sub.lo:sub.hi], cfg.optimizer)
    losses: list[float] = []
    for step in range(cfg.local_steps):
        t = step0 + step
        idx = sampler.next_indices()
        seed = step_seed(cfg.seed, round_idx, device, step)
        if mode in ("guided", "noise") and t % guide_every == 0:
            basis = guide_fn(theta) if mode == "guided" else log.bases[t]
            if mode == "guided":
                log.bases[t] = basis
        v = theta[sub.lo:sub.hi]
        if mode == "noise":
            assert basis is not None
            size = log.sizes[(round_idx, step)]
            signs = np.where(np.random.default_rng([seed, NOISE_KEY]).random(size.size) < 0.5,
                             -1.0, 1.0).astype(np.float32)
            seeds = zo.direction_seeds(seed, size.size)
            grad = zo_guided.reconstruct_guided(seeds, size * signs, basis, alpha)
        else:
            hb, yb = sub.h_ort[idx], st.y[idx]

            def f(values: np.ndarray, hb: np.ndarray = hb, yb: np.ndarray = yb,
                  at: np.ndarray = theta) -> float:
                full = at.copy()
                full[sub.lo:sub.hi] = values
                return sub.chain.loss_from(sub.start, hb, full, yb)

            loss0 = f(v)
            if mode == "guided":
                assert basis is not None
                est = zo_guided.estimate_guided(f, v, seed, basis, cfg.zo, alpha, loss0)
                log.sizes[(round_idx, step)] = np.abs(est.projected)
            else:
                est = zo.estimate(f, v, seed, cfg.zo, loss0)
            grad = est.grad
            losses.append(loss0)
            if not np.all(np.isfinite(grad)):
                raise FloatingPointError(f"{mode} ZO estimate at step {t} is not finite")
        new, state = zo.apply(v, grad, state, cfg.optimizer)
        theta = theta.copy()
        theta[sub.lo:sub.hi] = new
    return theta, basis, losses


def fo_round(st: Setting, sub: Subset, theta: np.ndarray, cfg: Any, *, round_idx: int,
             device: str, on_guide: bool) -> np.ndarray:
    """One round of backprop (Adam at cfg's lr) on θ[lo:hi], on the shard or the guide."""
    guide.load_device(st.split, st.manifest, theta)
    tensors = _set_tensors(st, sub)
    params = [p for _, p in tensors]
    if on_guide:
        assert sub.hg is not None and sub.mask_g is not None and sub.yg is not None
        h, mask, y = sub.hg, sub.mask_g, torch.from_numpy(sub.yg)
    else:
        h, mask, y = sub.h, sub.mask, torch.from_numpy(st.y)
    sampler = BatchSampler(len(y), cfg.batch_size, np.random.default_rng(
        [cfg.seed, round_idx, zlib.crc32(device.encode())]))
    o = cfg.optimizer
    opt = torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    with guide.grads_for(st.split, params):
        for _ in range(cfg.local_steps):
            idx = torch.from_numpy(sampler.next_indices())
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(tail_logits(st.split, sub.start, h[idx], mask[idx]),
                            y[idx]).backward()
            opt.step()
    out = theta.copy()
    for spec, p in tensors:
        out[spec.offset:spec.offset + spec.size] = p.detach().numpy().ravel()
    return out


def run_subset(st: Setting, cfg: ProgressConfig, base: Any, every: int,
               progress: Callable[[str], None]) -> tuple[dict[str, list[dict[str, Any]]],
                                                         dict[str, float], dict[str, Any]]:
    """All arms of one seed; (curves, ms per step, the ZO settings used)."""
    from baselines.progress import _moved

    assert cfg.train_set is not None
    seed = base.seed if cfg.seed is None else cfg.seed
    needs_guide = ("guided" in cfg.heron_directions and "heron" in cfg.arms) or \
        "guide-only" in cfg.arms
    gx, gy = guide.guide_rows(st, cfg.guide_size, seed) if needs_guide else (None, None)
    sub = open_subset(st, cfg.train_set, cfg.threads, gx, gy)
    eval_every = cfg.eval_every or every
    guide_every = cfg.guide_every or every
    d_set = sub.hi - sub.lo
    zo_cfg = replace(base.zo, q=cfg.heron_q or base.zo.q, mu=cfg.heron_mu or base.zo.mu)
    opt_name = cfg.heron_optimizer or base.optimizer.name
    lr_random = cfg.heron_lr or base.optimizer.lr
    lr_guided = cfg.guided_lr or lr_random * (d_set + 2) / (cfg.guide_rank + 2)
    start_eval = evaluate(st, sub, st.theta0)
    progress(f"step 0 (frozen device): test acc {start_eval['test_accuracy']:.4f}, loss "
             f"{start_eval['test_loss']:.4f}; training {cfg.train_set} ({d_set} weights)")
    arms: list[tuple[str, str]] = []  # (report name, kind)
    for a in cfg.arms:
        arms += ([(f"heron-{mode}", mode) for mode in cfg.heron_directions] if a == "heron"
                 else [(a, a)])
    log = GuidedLog({}, {})
    curves: dict[str, list[dict[str, Any]]] = {}
    ms: dict[str, float] = {}

    def guide_fn(theta: np.ndarray) -> np.ndarray:
        return subset_basis(st, sub, theta, cfg.guide_rank, cfg.guide_batch)

    for name, kind in arms:
        fo = kind in ("cse-fsl", "guide-only")
        steps = min(cfg.steps, cfg.fo_steps or cfg.steps) if fo else cfg.steps
        if fo:
            arm_cfg = replace(base, seed=seed, local_steps=every,
                              optimizer=OptimizerConfig(name="adam", lr=cfg.fo_lr))
        else:
            lr = lr_random if kind == "random" else lr_guided
            arm_cfg = replace(base, seed=seed, local_steps=every, zo=zo_cfg,
                              optimizer=replace(base.optimizer, name=opt_name, lr=lr))
        theta, spent, basis = st.theta0.copy(), 0.0, None
        points = [{"step": 0, **start_eval, **_moved(st.manifest, st.theta0, st.theta0)}]
        for r in range(-(-steps // every)):
            t0 = time.perf_counter()
            if fo:
                theta = fo_round(st, sub, theta, arm_cfg, round_idx=r, device=cfg.device,
                                 on_guide=kind == "guide-only")
            else:
                theta, basis, _ = zo_round(
                    st, sub, theta, arm_cfg, round_idx=r, device=cfg.device, mode=kind,
                    step0=r * every, guide_fn=guide_fn, guide_every=guide_every,
                    alpha=cfg.guide_alpha, log=log, basis=basis)
            spent += time.perf_counter() - t0
            step = (r + 1) * every
            if step % eval_every == 0 or step >= steps:
                point = {"step": step, **evaluate(st, sub, theta),
                         **_moved(st.manifest, st.theta0, theta)}
                points.append(point)
                progress(f"{name} step {step}: test acc {point['test_accuracy']:.4f}, "
                         f"loss {point['test_loss']:.4f}, client moved "
                         f"{point['client_moved']:.3f}")
        curves[name] = points
        ms[name] = 1000.0 * spent / steps
    guide.load_device(st.split, st.manifest, st.theta0)
    used = {"train_set": cfg.train_set, "d_set": d_set, "seed": seed, "zo": zo_cfg.__dict__,
            "optimizer": opt_name, "lr_random": lr_random, "lr_guided": lr_guided,
            "guide_size": cfg.guide_size, "guide_rank": cfg.guide_rank,
            "guide_batch": cfg.guide_batch, "guide_every": guide_every,
            "guide_alpha": cfg.guide_alpha, "fo_lr": cfg.fo_lr,
            "basis_bytes_fp16": 2 * d_set * cfg.guide_rank}
    return curves, ms, used


# --- paired statistics over seeds ------------------------------------------------------

def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences."""
    a = np.asarray(diffs, dtype=np.float64)
    mean = float(a.mean())
    if a.size < 2:
        return mean, math.nan, math.nan
    half = _T975[min(a.size - 1, len(_T975)) - 1] * float(a.std(ddof=1)) / math.sqrt(a.size)
    return mean, mean - half, mean + half


def _final(curve: list[dict[str, Any]]) -> dict[str, Any]:
    return curve[-1]


def _best(curve: list[dict[str, Any]]) -> dict[str, Any]:
    return min(curve[1:], key=lambda p: p["test_loss"])


def race_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired differences at each arm's last evaluation (and, for reference, at its best
    test loss along the curve), over the seeds' progress reports."""
    arms = list(reports[0]["curves"])
    frozen = "frozen (step 0)"
    ref = [r["curves"][arms[0]][0] for r in reports]
    rows = []
    pairs = [(a, frozen) for a in arms]
    guided = next((a for a in arms if a == "heron-guided"), None)
    if guided:
        pairs += [(guided, b) for b in arms if b != guided]
    for a, b in pairs:
        for metric in ("test_loss", "test_accuracy"):
            for at, pick in (("last", _final), ("best", _best)):
                da = [pick(r["curves"][a])[metric] for r in reports]
                db = ref if b == frozen else [pick(r["curves"][b])[metric] for r in reports]
                db_vals = [p[metric] for p in db] if b == frozen else db
                diffs = [x - y for x, y in zip(da, db_vals, strict=True)]
                mean, lo, hi = t_interval(diffs)
                rows.append({"a": a, "b": b, "metric": metric, "at": at, "mean": mean,
                             "lo": lo, "hi": hi, "diffs": diffs})
    steps = {a: _final(reports[0]["curves"][a])["step"] for a in arms}
    return {"arms": arms, "seeds": [r["subset"]["seed"] for r in reports], "steps": steps,
            "start": ref[0], "rows": rows,
            "step_ms": {a: float(np.mean([r["step_ms"][a] for r in reports])) for a in arms}}


def race_markdown(summary: dict[str, Any], used: dict[str, Any]) -> str:
    s = summary["start"]
    lines = [f"Paired over seeds {summary['seeds']}: mean difference [95% t-interval]; "
             f"loss in 1e-3, accuracy in points. Start (frozen device): acc "
             f"{100 * s['test_accuracy']:.2f}, loss {s['test_loss']:.4f}. Trained set "
             f"{used['train_set']} (d = {used['d_set']:,}); ZO {used['optimizer']} lr "
             f"random {used['lr_random']:g}, guided {used['lr_guided']:g}, mu "
             f"{used['zo']['mu']:g}, q {used['zo']['q']}; guide {used['guide_size']} rows, "
             f"rank {used['guide_rank']}, every {used['guide_every']} steps, alpha "
             f"{used['guide_alpha']:g}; backprop Adam lr {used['fo_lr']:g}. Steps: "
             + ", ".join(f"{a} {n}" for a, n in summary["steps"].items()) + ".", "",
             "| A - B | Δ loss, last (x1e-3) | Δ acc, last (pts) | Δ loss, best on curve | "
             "Δ acc at best loss |", "|---|---:|---:|---:|---:|"]
    keyed = {(r["a"], r["b"], r["metric"], r["at"]): r for r in summary["rows"]}
    seen = []
    for r in summary["rows"]:
        if (r["a"], r["b"]) not in seen:
            seen.append((r["a"], r["b"]))

    def cell(a: str, b: str, metric: str, at: str) -> str:
        row = keyed[(a, b, metric, at)]
        k = 1000.0 if metric == "test_loss" else 100.0
        return f"{k * row['mean']:+.2f} [{k * row['lo']:+.2f}, {k * row['hi']:+.2f}]"

    for a, b in seen:
        lines.append(f"| {a} - {b} | {cell(a, b, 'test_loss', 'last')} | "
                     f"{cell(a, b, 'test_accuracy', 'last')} | "
                     f"{cell(a, b, 'test_loss', 'best')} | "
                     f"{cell(a, b, 'test_accuracy', 'best')} |")
    lines += ["", "device ms/step (this machine, training only, incl. the guide's backprop "
              "for heron-guided): " + ", ".join(f"{a} {v:.0f}"
                                              for a, v in summary["step_ms"].items()), ""]
    return "\n".join(lines)


def write_race(out: Path, reports: list[dict[str, Any]]) -> dict[str, Any]:
    summary = race_summary(reports)
    used = reports[0]["subset"]
    (out / "race.json").write_text(json.dumps({"summary": summary, "subset": used},
                                              indent=2) + "\n")
    (out / "race.md").write_text(race_markdown(summary, used))
    return summary


__all__ = ["check_train_set", "race_summary", "run_subset", "write_race"]
