"""Activation-subspace screen (issue 15, item 3): where could `edge_runtime.zo_activation`'s
directions win at all? Measured, not trained.

For every weight of the device part that multiplies an input (dense and LoRA factors of a
linear map, conv kernels over im2col patches), with the server fixed at a finished run's
weights: P_r = the top-r input directions, from one of the device's batches ("one batch",
averaged over ``batches`` batches) or from the Gram matrix summed over them ("running"),
and ρ²(r) = ‖G P Pᵀ‖²/‖G‖² for G the mean gradient of the evaluated model's loss
server(client(x)) over the device's shard, over the test set, and (one batch only) the
batch's own gradient. A group's ρ² is energy-weighted over its tensors; relative to the
group's own gradient energy, so random directions in the group have ρ² = 1.

merit = 5000·ρ²/(d_eff+2) against random's 5000/(d+2): about how many backprop steps 5,000
single-direction ZO steps are worth (ZO-METHODS.md). It charges random directions the full
d; on one batch a linear layer's Hessian lies in the same input span, so random directions
at a step tuned for that effective rank do as well (tests/edge_runtime/
test_zo_activation.py) - the merit is an upper bound on what the subspace buys.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines import guide
from baselines.progress import Setting
from edge_runtime import zo_activation
from edge_runtime.data import BatchSampler
from exporter.minilm import LoRALinear

ACT_KEY = 0x616374  # "act": the screen's batch draw, apart from training's
MERIT_STEPS = 5000


@dataclass(frozen=True)
class Target:
    """One weight whose rows the activation subspace constrains."""

    name: str  # client parameter name
    kind: str  # dense | lora_A | lora_B | conv
    layer: int  # encoder layer index (minilm), else the module's position
    module: nn.Module
    param: nn.Parameter

    @property
    def out(self) -> int:
        return int(self.param.shape[0])

    @property
    def width(self) -> int:
        return int(self.param[0].numel())


def targets(client: nn.Module) -> list[Target]:
    """Every input-multiplying weight of the device part, in module order."""
    out: list[Target] = []
    for pos, (name, mod) in enumerate(client.named_modules()):
        parts = name.split(".")
        layer = int(parts[1]) if parts[0] == "layers" and len(parts) > 1 else pos
        if isinstance(mod, LoRALinear):
            out.append(Target(f"{name}.weight", "dense", layer, mod, mod.weight))
            if mod.rank:
                out.append(Target(f"{name}.lora_A", "lora_A", layer, mod, mod.lora_A))
                out.append(Target(f"{name}.lora_B", "lora_B", layer, mod, mod.lora_B))
        elif isinstance(mod, nn.Linear):
            out.append(Target(f"{name}.weight", "dense", layer, mod, mod.weight))
        elif isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise ValueError(f"{name}: grouped convs are not screened")
            out.append(Target(f"{name}.weight", "conv", layer, mod, mod.weight))
    if not out:
        raise ValueError("the device part has no linear or conv weight to screen")
    return out


def input_rows(t: Target, x: torch.Tensor) -> torch.Tensor:
    """The rows X (n × in) the weight multiplies, for the module's input x."""
    if t.kind == "conv":
        m = t.module
        assert isinstance(m, nn.Conv2d)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding,  # type: ignore[arg-type]
                        stride=m.stride)  # type: ignore[arg-type]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    rows = x.reshape(-1, x.shape[-1])
    if t.kind == "lora_B":
        rows = rows @ t.module.lora_A.T  # type: ignore[union-attr]
    return rows


def _pass(st: Setting, ts: list[Target], x: np.ndarray, y: np.ndarray, *, grams: bool
          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One forward and backward: each target's gradient of the mean loss and (optionally)
    its input Gram matrix XᵀX (float64)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [t.module.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__(id(mod), args[0].detach()))
        for t in {id(t.module): t for t in ts}.values()] if grams else []
    try:
        for t in ts:
            t.param.grad = None
        guide.full_loss(st.split, x, y).backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {t.name: np.zeros((t.out, t.width)) if t.param.grad is None
             else t.param.grad.reshape(t.out, -1).double().numpy() for t in ts}
    out: dict[str, np.ndarray] = {}
    if grams:
        with torch.no_grad():
            for t in ts:
                rows = input_rows(t, seen[id(t.module)]).double()
                out[t.name] = (rows.T @ rows).numpy()
    return grads, out


def mean_gradient(st: Setting, ts: list[Target], x: np.ndarray, y: np.ndarray,
                  batch: int = 64) -> dict[str, np.ndarray]:
    """Each target's gradient of the mean loss over (x, y), in batches."""
    total = {t.name: np.zeros((t.out, t.width)) for t in ts}
    for i in range(0, len(y), batch):
        g, _ = _pass(st, ts, x[i:i + batch], y[i:i + batch], grams=False)
        for k, v in g.items():
            total[k] += v * len(y[i:i + batch])
    return {k: v / len(y) for k, v in total.items()}


def _share(kept: float, total: float) -> float:
    """kept/total; NaN for a group with no gradient at all (a frozen run's LoRA-A: B = 0)."""
    return kept / total if total > 0 else float("nan")


def groups(ts: list[Target]) -> dict[str, list[str]]:
    """Named sets of targets: each kind whole, and (layered models) its last one or two
    layers; a set equal to an earlier one is dropped."""
    out: dict[str, list[str]] = {}
    layered = all(t.name.startswith("layers.") for t in ts if t.kind != "conv") and any(
        t.name.startswith("layers.") for t in ts)
    for kind in ("dense", "lora_A", "lora_B", "conv"):
        of = [t for t in ts if t.kind == kind]
        if not of:
            continue
        cands = {f"{kind}-all": of}
        if layered:
            top = max(t.layer for t in of)
            for n in (1, 2):
                cands[f"{kind}-last{n}"] = [t for t in of if t.layer > top - n]
        if kind == "conv":
            for t in of:
                cands[t.name.rsplit(".", 1)[0]] = [t]
        for name, members in cands.items():
            names = [t.name for t in members]
            if names not in out.values():
                out[name] = names
    return out


def measure(st: Setting, ranks: tuple[int, ...], batches: int, seed: int, *,
            progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """ρ²(r) per target and group for P from one batch and from the running Gram matrix
    (module doc); the device part as the run left it (st.theta0)."""
    split, manifest = st.split, st.manifest
    guide.load_device(split, manifest, st.theta0)
    ts = targets(split.client)
    t0 = time.perf_counter()
    with guide.grads_for(split, [t.param for t in ts]):
        g_mean = {"shard": mean_gradient(st, ts, st.x, st.y),
                  "test": mean_gradient(st, ts, st.xe.numpy(), st.ye.numpy())}
        progress(f"mean gradients of {len(ts)} weights over the shard ({len(st.y)}) and the "
                 f"test set ({len(st.ye)}): {time.perf_counter() - t0:.0f} s")
        sampler = BatchSampler(len(st.y), st.base.batch_size, np.random.default_rng(
            [seed, ACT_KEY, zlib.crc32(st.run.get("dataset", "").encode())]))
        rmax = max(ranks)
        # kept[src][name][r]: energy of G in span(P_r), one entry per batch's P
        one: dict[str, dict[str, dict[int, list[float]]]] = {
            s: {t.name: {r: [] for r in ranks} for t in ts} for s in ("shard", "test", "batch")}
        batch_energy: dict[str, list[float]] = {t.name: [] for t in ts}
        gram_sum: dict[str, np.ndarray] = {}
        for _ in range(batches):
            idx = sampler.next_indices()
            g_b, grams = _pass(st, ts, st.x[idx], st.y[idx], grams=True)
            bases: dict[tuple[int, bool], np.ndarray] = {}  # weight and lora_A share inputs
            for t in ts:
                key = (id(t.module), t.kind == "lora_B")
                if key not in bases:
                    bases[key] = zo_activation.basis_from_gram(
                        grams[t.name], min(rmax, t.width)).astype(np.float64)
                gram_sum[t.name] = gram_sum.get(t.name, 0.0) + grams[t.name]
                batch_energy[t.name].append(float(np.sum(g_b[t.name] ** 2)))
                srcs = {"shard": g_mean["shard"][t.name], "test": g_mean["test"][t.name],
                        "batch": g_b[t.name]}
                for s, g in srcs.items():
                    proj = g @ bases[key]
                    for r in ranks:
                        one[s][t.name][r].append(float(np.sum(proj[:, :min(r, t.width)] ** 2)))
    guide.load_device(split, manifest, st.theta0)
    energy = {src: {k: float(np.sum(v * v)) for k, v in g.items()} for src, g in g_mean.items()}
    run_kept: dict[str, dict[str, dict[int, float]]] = {
        s: {t.name: {} for t in ts} for s in ("shard", "test")}
    for t in ts:
        p = zo_activation.basis_from_gram(gram_sum[t.name], min(rmax, t.width)).astype(
            np.float64)
        for s in ("shard", "test"):
            proj = g_mean[s][t.name] @ p
            for r in ranks:
                run_kept[s][t.name][r] = float(np.sum(proj[:, :min(r, t.width)] ** 2))
    progress(f"activation bases ({batches} batches, r up to {rmax}): "
             f"{time.perf_counter() - t0:.0f} s")

    def row(name: str, members: list[str]) -> dict[str, Any]:
        by = {t.name: t for t in ts}
        d = sum(by[m].out * by[m].width for m in members)
        out: dict[str, Any] = {"group": name, "tensors": members, "d": d,
                               "width": sorted({by[m].width for m in members}),
                               "energy_shard": sum(energy["shard"][m] for m in members),
                               "energy_test": sum(energy["test"][m] for m in members),
                               "merit_random": MERIT_STEPS / (d + 2), "r": {}}
        for r in ranks:
            d_eff = sum(by[m].out * min(r, by[m].width) for m in members)
            cell: dict[str, Any] = {"d_eff": d_eff}
            for s in ("shard", "test"):
                tot = out[f"energy_{s}"]
                cell[f"rho2_{s}_one"] = float(np.mean([
                    _share(sum(one[s][m][r][b] for m in members), tot)
                    for b in range(batches)]))
                cell[f"rho2_{s}_run"] = _share(sum(run_kept[s][m][r] for m in members), tot)
            cell["rho2_batch_one"] = float(np.mean([
                _share(sum(one["batch"][m][r][b] for m in members),
                       sum(batch_energy[m][b] for m in members)) for b in range(batches)]))
            for key in [k for k in cell if k.startswith("rho2_")]:
                cell[key.replace("rho2_", "merit_")] = MERIT_STEPS * cell[key] / (d_eff + 2)
            out["r"][r] = cell
        return out

    rows = [row(t.name, [t.name]) for t in ts]
    group_rows = [row(name, members) for name, members in groups(ts).items()]
    return {"ranks": list(ranks), "batches": batches, "batch_size": st.base.batch_size,
            "tensors": rows, "groups": group_rows,
            "seconds": time.perf_counter() - t0}


def markdown(act: dict[str, Any]) -> list[str]:
    """The groups' table: one line per (group, r)."""
    lines = [f"Activation subspace: P = top-r input directions of the device's own batches "
             f"(batch {act['batch_size']}; 'one' = one batch's P, averaged over "
             f"{act['batches']} batches; 'run' = the Gram matrix summed over them). rho2 = "
             "share of the group's mean-gradient energy (shard / test set) or of the batch's "
             "own gradient in span(P); merit = 5000·rho2/(d_eff+2), random's = 5000/(d+2).",
             "", "| group | d | in | r | d_eff | rho2 shard one / run | rho2 test one / run | "
             "rho2 own batch | merit shard run | merit test run | merit random |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in act["groups"]:
        for r, c in g["r"].items():
            lines.append(
                f"| {g['group']} | {g['d']:,} | {'/'.join(map(str, g['width']))} | {r} | "
                f"{c['d_eff']:,} | {c['rho2_shard_one']:.3f} / {c['rho2_shard_run']:.3f} | "
                f"{c['rho2_test_one']:.3f} / {c['rho2_test_run']:.3f} | "
                f"{c['rho2_batch_one']:.3f} | {c['merit_shard_run']:.3g} | "
                f"{c['merit_test_run']:.3g} | {g['merit_random']:.3g} |")
    return lines
