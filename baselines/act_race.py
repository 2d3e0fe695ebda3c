"""The activation-subspace race (issue 15, item 3): ZO with `edge_runtime.zo_activation`'s
directions against random directions, frozen and backprop, server fixed, any model.

``heron bench --workload progress --heron-directions random,activation --race-seeds ...``
(no ``--train-set``). Every arm trains the device's input-multiplying weights (conv
kernels, dense/LoRA matrices: `baselines.act_screen.targets`; biases stay) on one device's
shard against the evaluated model's loss server(client(x)) - the server fixed at the run's
weights, as if the aux head were the server (at minilm/layer5 it is; at a CNN cut it is an
upper bound on what a device's own loss could give). Arms, paired over seeds (same batches):

- ``random``: q isotropic directions over the d weights, SGD lr_FO/(d+2);
- ``activation``: directions Z Pᵀ per weight, P the top-``act_rank`` input directions of the
  device's current batch, refreshed every ``act_refresh`` steps, SGD lr_FO/(d_eff+2);
- ``random-matched``: isotropic directions at the activation arm's lr (the effective-rank
  control: on one batch a linear layer's Hessian lies in the input span, so random
  directions may tolerate that step too, tests/edge_runtime/test_zo_activation.py);
- ``cse-fsl``: backprop of the same loss on the same weights, Adam at ``fo_lr`` (ceiling).

lr_FO is ``--heron-lr`` (a first-order SGD step size); ZO uses forward differences, the
run's μ unless ``--heron-mu``. Frozen is step 0 of every curve.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from baselines import act_screen, guide
from baselines.race import t_interval
from edge_runtime import zo, zo_activation
from edge_runtime.data import BatchSampler
from edge_runtime.protocol import ZOConfig

if TYPE_CHECKING:
    from baselines.progress import ProgressConfig, Setting

RACE_KEY = 0x72616365  # "race": batch order per seed
ZO_ARMS = ("random", "activation", "random-matched")


class _Weights:
    """The targets' weights as one flat float32 vector, written into the torch model."""

    def __init__(self, st: Setting) -> None:
        self.st = st
        self.ts = act_screen.targets(st.split.client)
        self.sizes = [t.param.numel() for t in self.ts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int)
        self.d = int(sum(self.sizes))

    def get(self) -> np.ndarray:
        return np.concatenate([t.param.detach().reshape(-1).numpy() for t in self.ts]
                              ).astype(np.float32)

    def set(self, theta: np.ndarray) -> None:
        with torch.no_grad():
            for t, off, n in zip(self.ts, self.offsets, self.sizes, strict=True):
                t.param.copy_(torch.from_numpy(theta[off:off + n].reshape(t.param.shape)))

    def loss(self, theta: np.ndarray, xb: np.ndarray, yb: np.ndarray) -> float:
        self.set(theta)
        with torch.no_grad():
            return float(guide.full_loss(self.st.split, xb, yb))

    def layers(self, xb: np.ndarray, r: int) -> list[zo_activation.ActLayer]:
        """The batch's activation bases, from one forward (what the device's own
        unperturbed pass sees)."""
        seen: dict[int, torch.Tensor] = {}
        hooks = [t.module.register_forward_pre_hook(
            lambda mod, args: seen.__setitem__(id(mod), args[0].detach())) for t in self.ts]
        try:
            with torch.no_grad():
                self.st.split.client(torch.from_numpy(np.ascontiguousarray(xb)))
        finally:
            for h in hooks:
                h.remove()
        out = []
        with torch.no_grad():
            for t, off in zip(self.ts, self.offsets, strict=True):
                rows = act_screen.input_rows(t, seen[id(t.module)])  # float32 Gram: fast,
                gram = (rows.T @ rows).double().numpy()  # and the top few directions hold
                p = zo_activation.basis_from_gram(gram, min(r, t.width))  # most of its energy
                out.append(zo_activation.ActLayer(int(off), t.out, p))
        return out


def _evaluate(st: Setting) -> dict[str, float]:
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(st.ye), 128):
            logits = st.split.server(st.split.client(st.xe[i:i + 128]))
            correct += int((logits.argmax(1) == st.ye[i:i + 128]).sum())
            loss += float(F.cross_entropy(logits, st.ye[i:i + 128], reduction="sum"))
    return {"test_accuracy": correct / len(st.ye), "test_loss": loss / len(st.ye)}


def run_seed(st: Setting, cfg: ProgressConfig, seed: int, lr_fo: float, zcfg: ZOConfig,
             progress: Callable[[str], None]) -> dict[str, Any]:
    """Every arm from the run's weights on the same batches; test curves."""
    guide.load_device(st.split, st.manifest, st.theta0)  # the run's final device weights
    w = _Weights(st)
    theta0 = w.get()
    every = cfg.eval_every or 100
    d_eff = sum(t.out * min(cfg.act_rank, t.width) for t in w.ts)
    lrs = {"random": lr_fo / (w.d + 2), "activation": lr_fo / (d_eff + 2),
           "random-matched": lr_fo / (d_eff + 2)}
    arms = [a for a in ("random", "activation", "random-matched")
            if a != "activation" or "activation" in cfg.heron_directions]
    if "cse-fsl" in cfg.arms:
        arms.append("cse-fsl")
    w.set(theta0)
    start = _evaluate(st)
    curves: dict[str, Any] = {}
    for arm in arms:
        sampler = BatchSampler(len(st.y), st.base.batch_size, np.random.default_rng(
            [seed, RACE_KEY, zlib.crc32(cfg.device.encode())]))
        theta = theta0.copy()
        w.set(theta)
        curve = [{"step": 0, **start}]
        layers: list[zo_activation.ActLayer] = []
        spent = 0.0
        opt = None
        if arm == "cse-fsl":
            params = [t.param for t in w.ts]
            opt = torch.optim.Adam(params, lr=cfg.fo_lr)
        with guide.grads_for(st.split, [t.param for t in w.ts] if opt else []):
            for step in range(1, cfg.steps + 1):
                idx = sampler.next_indices()
                xb, yb = st.x[idx], st.y[idx]
                t0 = time.perf_counter()
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                    guide.full_loss(st.split, xb, yb).backward()
                    opt.step()
                else:
                    sseed = zo.step_seed(seed, 0, f"{cfg.device}/{arm}", step)

                    def f(th: np.ndarray, xb: np.ndarray = xb, yb: np.ndarray = yb) -> float:
                        return w.loss(th, xb, yb)
                    if arm == "activation":
                        if (step - 1) % cfg.act_refresh == 0:
                            w.set(theta)
                            layers = w.layers(xb, cfg.act_rank)
                        est = zo_activation.estimate_activation(f, theta, sseed, layers, zcfg)
                    else:
                        est = zo.estimate(f, theta, sseed, zcfg)
                    theta = (theta - np.float32(lrs[arm]) * est.grad).astype(np.float32)
                    if not np.all(np.isfinite(theta)):
                        progress(f"seed {seed} {arm}: diverged at step {step}")
                        break
                    w.set(theta)
                spent += time.perf_counter() - t0
                if step % every == 0 or step == cfg.steps:
                    point = {"step": step, **_evaluate(st)}
                    curve.append(point)
                    progress(f"seed {seed} {arm} step {step}: test acc "
                             f"{point['test_accuracy']:.4f}, loss {point['test_loss']:.4f}")
        curves[arm] = {"curve": curve, "lr": cfg.fo_lr if opt else lrs[arm],
                       "ms_per_step": 1000 * spent / max(1, curve[-1]["step"])}
    w.set(theta0)
    return {"seed": seed, "start": start, "arms": curves, "d": w.d, "d_eff": d_eff,
            "tensors": [t.name for t in w.ts]}


def _pairs(arms: list[str]) -> list[tuple[str, str]]:
    out = [(a, "frozen") for a in arms]
    for a, b in (("activation", "random"), ("activation", "random-matched"),
                 ("cse-fsl", "activation")):
        if a in arms and b in arms:
            out.append((a, b))
    return out


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired per-seed differences at the last step: loss (x1e-3) and accuracy (points)."""
    arms = list(seeds[0]["arms"])

    def last(rep: dict[str, Any], arm: str) -> dict[str, float]:
        if arm == "frozen":
            return rep["start"]
        point = rep["arms"][arm]["curve"][-1]
        return point if point["step"] > 0 else {"test_loss": float("nan"),
                                                "test_accuracy": float("nan")}

    rows = []
    for a, b in _pairs(arms):
        dl = [1e3 * (last(r, a)["test_loss"] - last(r, b)["test_loss"]) for r in seeds]
        da = [100 * (last(r, a)["test_accuracy"] - last(r, b)["test_accuracy"]) for r in seeds]
        rows.append({"a": a, "b": b, "dloss": dl, "dacc": da,
                     "dloss_ci": t_interval(dl), "dacc_ci": t_interval(da)})
    return {"seeds": [r["seed"] for r in seeds], "rows": rows,
            "steps": {a: seeds[0]["arms"][a]["curve"][-1]["step"] for a in arms},
            "lrs": {a: seeds[0]["arms"][a]["lr"] for a in arms},
            "ms_per_step": {a: float(np.mean([r["arms"][a]["ms_per_step"] for r in seeds]))
                            for a in arms}}


def markdown(summary: dict[str, Any], first: dict[str, Any], cfg: ProgressConfig,
             lr_fo: float) -> str:
    s = first["start"]
    lines = [f"Paired over seeds {summary['seeds']}, at the last step; loss in 1e-3, accuracy "
             f"in points. Start (frozen): acc {100 * s['test_accuracy']:.2f}, loss "
             f"{s['test_loss']:.4f}. Trained: {', '.join(first['tensors'])} (d = "
             f"{first['d']:,}; activation rank {cfg.act_rank}: d_eff = {first['d_eff']:,}, "
             f"P refreshed every {cfg.act_refresh} steps). lr_FO {lr_fo:g}: "
             + ", ".join(f"{a} {lr:.3g}" for a, lr in summary["lrs"].items())
             + ". Steps: " + ", ".join(f"{a} {n}" for a, n in summary["steps"].items())
             + "; ms/step: " + ", ".join(f"{a} {v:.0f}" for a, v in
                                         summary["ms_per_step"].items()) + ".", "",
             "| A - B | Δ loss (x1e-3) [95% t] | Δ acc, pts [95% t] | per seed, acc |",
             "|---|---:|---:|---|"]
    for r in summary["rows"]:
        ml, lo_l, hi_l = r["dloss_ci"]
        ma, lo_a, hi_a = r["dacc_ci"]
        lines.append(f"| {r['a']} - {r['b']} | {ml:+.1f} [{lo_l:+.1f}, {hi_l:+.1f}] | "
                     f"{ma:+.2f} [{lo_a:+.2f}, {hi_a:+.2f}] | "
                     + " / ".join(f"{v:+.2f}" for v in r["dacc"]) + " |")
    return "\n".join(lines) + "\n"


def run_act_race(out: str | Path, cfg: ProgressConfig, *, command: str = "",
                 progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from baselines.progress import open_setting

    st = open_setting(cfg.run_dir, device=cfg.device, aux_from_server=False,
                      threads=cfg.threads, eval_samples=cfg.eval_samples)
    zcfg = ZOConfig(mu=cfg.heron_mu or st.base.zo.mu, q=cfg.heron_q or 1)
    lr_fo = cfg.heron_lr if cfg.heron_lr is not None else 0.1
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = []
    for seed in cfg.seeds or (cfg.seed or 0,):
        path = out / f"seed-{seed}.json"
        key = json.loads(json.dumps(asdict(replace(cfg, seeds=(), seed=seed))))
        if path.exists() and json.loads(path.read_text()).get("config") == key:
            progress(f"--- seed {seed}: reusing {path}")
            seeds.append(json.loads(path.read_text()))
            continue
        progress(f"--- seed {seed}")
        rep = {**run_seed(st, cfg, seed, lr_fo, zcfg, progress), "config": key}
        path.write_text(json.dumps(rep, indent=2) + "\n")
        seeds.append(rep)
    summary = summarise(seeds)
    report = {"workload": "progress", "race": "activation", "command": command,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "lr_fo": lr_fo,
              "zo": asdict(zcfg), "summary": summary,
              "run": {"model": st.manifest.model, "cut": st.manifest.cut,
                      "dataset": st.run["dataset"], "device": cfg.device,
                      "shard_samples": len(st.y), "test_samples": len(st.ye),
                      "batch_size": st.base.batch_size}}
    (out / "race.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "race.md").write_text(markdown(summary, seeds[0], cfg, lr_fo))
    return report
