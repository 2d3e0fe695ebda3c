"""First-order ceiling screen (issue 15, step 1): which device weights could ZO train at all?

From a finished federation (as the progress bench: server fixed at its final weights, aux
head copied from the server, so at a cut like minilm/layer5 the device's loss *is* the
evaluated loss), backprop is run restricted to a candidate set S of device weights on one
device's shard, and the evaluated model server(client(x)) is scored on the test set every
``eval_every`` steps. Per set it reports the best change in test loss and accuracy over
the curve and a small Adam learning-rate grid (selected on the test set: a ceiling, not an
estimate), and ρ²: the share of the shard's mean gradient energy that lies in S.

Sets (minilm; d_S in brackets at layer5):
- ``lora-all`` [61,440], ``lora-lastN`` (LoRA of the last N device layers), ``lora-B``,
  ``lora-B-lastN``: subsets of what the bundle trains today;
- ``lnbias-lastN``, ``lnbias-all``: LayerNorm gains/biases and every bias of the last N
  layers (all layers + the embeddings' LayerNorm): frozen in today's bundle, measured here
  in torch to see whether a different trainable set would pay;
- ``ffnout-lastN`` (the feed-forward output map and the LayerNorm after it) and
  ``ffnnorm-lastN`` (that LayerNorm alone) of the last N layers: at N = 1 the weights whose
  exact gradient needs only the cut's gradient ∂l/∂h, the LayerNorm's closed-form backward
  and the map's cached input (no backprop through attention or the rest of the layer), so a
  device could compute it with forward-only ops; frozen in today's bundle;
- ``guided-K``: the span of the top-K directions of the full model's gradients on a guide
  set of held-out rows (``dev.tsv``) no device sees (`baselines.guide`), recomputed every
  ``guide_every`` steps at the current weights; trained as θ = θ_base + U w, Adam on w;
- ``random-K``: the same with a random orthonormal basis (the control);
- ``guided-K-lastN``, ``random-K-lastN``: the same inside the LoRA of the last N layers
  (what the race trains, `baselines.race`);
- ``act-rR``: not trained, measured: the share of each input-multiplying weight's mean
  gradient in the span of the top-R input directions of the device's own batches, the
  subspace `edge_runtime.zo_activation` perturbs (`baselines.act_screen`). Any model: with
  only act-rR sets the screen runs on CNNs too.

Why ρ² matters (ZO-METHODS.md): ZO-SGD with q=1 in an n-dimensional set makes progress
per step ∝ ρ²/(n+2) of a first-order step, so 5,000·ρ²/(n+2) is roughly how many
backprop steps 5,000 ZO steps are worth. For lnbias sets ρ² is relative to the all-LoRA
energy (a different parametrisation: it can exceed 1).

The forward from a set's first trained layer on starts from cached hidden states (the
layers below it are fixed, `baselines.minilm_tail`), so screening the last layers is cheap;
the report's rows and markdown are `baselines.screen_report`'s.
"""

from __future__ import annotations

import json
import math
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines import act_screen, guide
from baselines.minilm_tail import device_layers, prefix, tail_grads, tail_logits
from baselines.progress import Setting, open_setting
from baselines.screen_report import row_md, screen_markdown, summarise
from edge_runtime import zo_guided
from edge_runtime.data import BatchSampler

DEFAULT_SETS = ("lora-all", "lora-last1", "lora-last2", "lora-B", "lnbias-last1",
                "lnbias-last2", "lnbias-all", "guided-1", "guided-4", "guided-16", "random-16")
_SET = re.compile(r"^(lora-all|lora-B|lnbias-all|(lora|lora-B|lnbias|ffnout|ffnnorm)-last(\d+)|"
                  r"(guided|random)-(\d+)(-last(\d+))?)$")
_ACT = re.compile(r"^act-r(\d+)$")


@dataclass(frozen=True)
class ScreenConfig:
    run_dir: str
    steps: int = 200
    eval_every: int = 40
    device: str = "dev-0"
    sets: tuple[str, ...] = DEFAULT_SETS
    lrs: tuple[float, ...] = (1e-3, 3e-3)  # Adam lr grid for parameter sets
    moves: tuple[float, ...] = (0.03, 0.1)  # subspaces: Adam lr = move / sqrt(K)
    guide_size: int = 256
    guide_batch: int = 16
    guide_every: int = 50
    optimizer: str = "adam"  # adam | sgd (subspaces: lr = move / sqrt(K) either way)
    seed: int = 0
    threads: int = 1
    eval_samples: int | None = None
    act_batches: int = 10  # act-rR sets: batches whose inputs give P (one each, and summed)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1 or self.guide_every < 1:
            raise ValueError("--steps, --eval-every and --guide-every must be >= 1")
        bad = [s for s in self.sets if not (_SET.match(s) or _ACT.match(s))]
        if bad or not self.sets:
            raise ValueError(f"unknown screen set(s) {bad}; help: lora-all, lora-lastN, "
                             "lora-B, lora-B-lastN, lnbias-lastN, lnbias-all, ffnout-lastN, "
                             "ffnnorm-lastN, guided-K, random-K, guided-K-lastN, "
                             "random-K-lastN, act-rR")
        if any(int(m.group(1)) < 1 for s in self.sets if (m := _ACT.match(s))):
            raise ValueError("act-rR needs a rank R >= 1")
        if self.act_batches < 1:
            raise ValueError("--act-batches must be >= 1")
        if not self.lrs or not self.moves or min(*self.lrs, *self.moves) <= 0:
            raise ValueError("learning rates must be positive")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"--screen-optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.guide_size < 1 or self.guide_batch < 1:
            raise ValueError("--guide-size and --guide-batch must be >= 1")


@dataclass
class _Cached:
    start: int
    h: torch.Tensor  # shard
    mask: torch.Tensor
    he: torch.Tensor  # test set
    mask_e: torch.Tensor


def _evaluate(split: Any, c: _Cached, ye: torch.Tensor) -> dict[str, float]:
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(ye), 128):
            logits = tail_logits(split, c.start, c.he[i:i + 128], c.mask_e[i:i + 128])
            correct += int((logits.argmax(1) == ye[i:i + 128]).sum())
            loss += float(F.cross_entropy(logits, ye[i:i + 128], reduction="sum"))
    return {"test_accuracy": correct / len(ye), "test_loss": loss / len(ye)}


# --- the candidate sets --------------------------------------------------------------------

def _is_lnbias(name: str, module: nn.Module) -> bool:
    return "lora_" not in name and (name.endswith(".bias") or isinstance(module, nn.LayerNorm))


def set_params(split: Any, name: str) -> list[tuple[str, nn.Parameter]]:
    """(client name, parameter) of a parameter set, e.g. lora-last2."""
    n_layers = len(device_layers(split))
    m = _SET.match(name)
    assert m is not None
    last = int(m.group(3)) if m.group(3) else n_layers
    if last < 1 or last > n_layers:
        raise ValueError(f"{name}: the device has {n_layers} layers")
    owners = {n: mod for n, mod in split.client.named_modules()}
    out = []
    for pname, p in split.client.named_parameters():
        parts = pname.split(".")
        layer = int(parts[1]) if parts[0] == "layers" else -1
        in_last = layer >= n_layers - last if m.group(3) else True
        module = owners[".".join(parts[:-1])]
        if name.startswith("lnbias"):
            ok = _is_lnbias(pname, module) and (in_last or name == "lnbias-all")
            ok = ok and (layer >= 0 or name == "lnbias-all")
        elif name.startswith(("ffnout", "ffnnorm")):
            kinds = (".ffn_norm.",) if name.startswith("ffnnorm") else (".ffn_out.", ".ffn_norm.")
            ok = in_last and layer >= 0 and "lora_" not in pname and any(
                k in f".{pname}" for k in kinds)
        elif name.startswith("lora-B"):
            ok = "lora_B" in pname and in_last
        else:
            ok = "lora_" in pname and in_last
        if ok:
            out.append((pname, p))
    if not out:
        raise ValueError(f"screen set {name} holds no parameter of {split.model}")
    return out


def _start_of(names: list[str]) -> int:
    layers = [int(n.split(".")[1]) if n.startswith("layers.") else -1 for n in names]
    return min(layers)


def _flat(manifest: Any, owned: list[nn.Parameter | None]) -> np.ndarray:
    out = np.zeros(manifest.num_params, dtype=np.float32)
    for spec, p in zip(manifest.params, owned, strict=True):
        if p is not None and p.grad is not None:
            out[spec.offset:spec.offset + spec.size] = p.grad.numpy().ravel()
    return out


def shard_gradient(st: Setting, names: list[str], batch: int = 50) -> dict[str, np.ndarray]:
    """Mean gradient of the full loss over the whole shard, per client parameter name."""
    params = dict(st.split.client.named_parameters())
    live = [params[n] for n in names]
    total = {n: np.zeros(tuple(params[n].shape), dtype=np.float64) for n in names}
    with guide.grads_for(st.split, live):
        for i in range(0, len(st.y), batch):
            for p in live:
                p.grad = None
            xb, yb = st.x[i:i + batch], st.y[i:i + batch]
            guide.full_loss(st.split, xb, yb).backward()
            for n in names:
                g = params[n].grad
                if g is not None:
                    total[n] += g.numpy().astype(np.float64) * len(yb)
        for p in live:
            p.grad = None
    return {n: (v / len(st.y)).astype(np.float32) for n, v in total.items()}


def _optimizer(cfg: ScreenConfig, params: list[Any], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


def _train(st: Setting, cfg: ScreenConfig, name: str, lr: float, cache: _Cached,
           start_eval: dict[str, float], basis_fn: Callable[[np.ndarray], np.ndarray] | None,
           progress: Callable[[str], None]) -> dict[str, Any]:
    """Backprop restricted to one set at one lr; the evaluated model's curve."""
    split, manifest = st.split, st.manifest
    client_state = {k: v.clone() for k, v in split.client.state_dict().items()}
    guide.load_device(split, manifest, st.theta0)
    batch = st.base.batch_size
    sampler = BatchSampler(len(st.y), batch, np.random.default_rng(
        [cfg.seed, 0, zlib.crc32(cfg.device.encode())]))
    y = torch.from_numpy(st.y)
    curve = [{"step": 0, **start_eval}]
    spent = 0.0
    owned = guide.manifest_params(split, manifest)
    if basis_fn is None:
        params = [p for _, p in set_params(split, name)]
        opt: torch.optim.Optimizer = _optimizer(cfg, params, lr)
    else:
        params = [p for p in owned if p is not None]
        theta_base = st.theta0.copy()
        basis = basis_fn(theta_base)
        w = torch.zeros(basis.shape[1], requires_grad=True)
        opt = _optimizer(cfg, [w], lr)
    with guide.grads_for(split, params):
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            if basis_fn is not None and step > 1 and (step - 1) % cfg.guide_every == 0:
                theta_base = theta_base + basis @ w.detach().numpy()
                basis = basis_fn(theta_base)
                w = torch.zeros(basis.shape[1], requires_grad=True)
                opt = _optimizer(cfg, [w], lr)
            idx = torch.from_numpy(sampler.next_indices())
            for p in params:
                p.grad = None
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(tail_logits(split, cache.start, cache.h[idx],
                                               cache.mask[idx]), y[idx])
            loss.backward()
            if basis_fn is not None:
                g = _flat(manifest, owned)
                w.grad = torch.from_numpy(basis.T @ g)
            opt.step()
            if basis_fn is not None:
                guide.load_device(split, manifest,
                               theta_base + basis @ w.detach().numpy())
            spent += time.perf_counter() - t0
            if step % cfg.eval_every == 0 or step == cfg.steps:
                point = {"step": step, **_evaluate(split, cache, st.ye)}
                curve.append(point)
                progress(f"{name} lr {lr:g} step {step}: test acc "
                         f"{point['test_accuracy']:.4f}, loss {point['test_loss']:.4f}")
    split.client.load_state_dict(client_state)
    return {"lr": lr, "curve": curve, "ms_per_step": 1000.0 * spent / cfg.steps}


def signal_check(st: Setting, gx: np.ndarray | None, gy: np.ndarray | None,
                 layers: int = 1) -> dict[str, float]:
    """How much of the shard's gradient generalises: cosines between the mean gradients
    (LoRA of the last `layers` layers) of the shard, the guide set and the test set. A
    diagnostic only: the test set never trains anything. A federation's shards are data
    the server already fit; their gradient can point away from held-out data's."""
    split, manifest = st.split, st.manifest
    n = len(device_layers(split))
    start = n - layers
    names = {nm for nm, _ in set_params(split, f"lora-last{layers}")}
    offs = [spec.offset for spec in manifest.params
            if spec.role == "client" and spec.name[len("client."):] in names]
    sizes = {spec.offset: spec.size for spec in manifest.params}
    lo, hi = min(offs), max(offs) + sizes[max(offs)]

    def mean(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        h = prefix(split, x, start)
        mask = torch.from_numpy(np.ascontiguousarray(x[:, 1]))
        cols = tail_grads(split, manifest, st.theta0, start, h, mask, y, lo, hi, 100)
        w = np.asarray([min(100, len(y) - i) for i in range(0, len(y), 100)], np.float64)
        return (cols.astype(np.float64) @ w) / w.sum()

    out: dict[str, float] = {}
    grads = {"shard": mean(st.x, st.y), "test": mean(st.xe.numpy(), st.ye.numpy())}
    if gx is not None and gy is not None:
        grads["guide"] = mean(gx, gy)
    for k, g in grads.items():
        out[f"norm_{k}"] = float(np.linalg.norm(g))
    keys = list(grads)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            out[f"cos_{a}_{b}"] = float(grads[a] @ grads[b] / (
                np.linalg.norm(grads[a]) * np.linalg.norm(grads[b])))
    guide.load_device(split, manifest, st.theta0)
    return out


def _act_only(out: Path, cfg: ScreenConfig, st: Setting, activation: dict[str, Any],
              command: str) -> dict[str, Any]:
    report = {"workload": "screen", "command": command,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "config": asdict(cfg),
              "run": {"model": st.manifest.model, "cut": st.manifest.cut,
                      "dataset": st.run["dataset"], "num_params": st.manifest.num_params,
                      "test_samples": len(st.ye), "shard_samples": len(st.y),
                      "batch_size": st.base.batch_size},
              "start": _evaluate_full(st), "activation": activation, "rows": []}
    out.mkdir(parents=True, exist_ok=True)
    (out / "screen.json").write_text(json.dumps(report, indent=2) + "\n")
    r = report["run"]
    lines = [f"{r['model']}/{r['cut']} on {r['dataset']}, server fixed; {cfg.device}'s "
             f"{r['shard_samples']} samples, test set {r['test_samples']}. Start (frozen "
             f"device): acc {100 * report['start']['test_accuracy']:.2f}, loss "
             f"{report['start']['test_loss']:.4f}.", "", *act_screen.markdown(activation)]
    (out / "screen.md").write_text("\n".join(lines) + "\n")
    return report


def _evaluate_full(st: Setting) -> dict[str, float]:
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(st.ye), 128):
            logits = st.split.server(st.split.client(st.xe[i:i + 128]))
            correct += int((logits.argmax(1) == st.ye[i:i + 128]).sum())
            loss += float(F.cross_entropy(logits, st.ye[i:i + 128], reduction="sum"))
    return {"test_accuracy": correct / len(st.ye), "test_loss": loss / len(st.ye)}


def run_screen(out: str | Path, cfg: ScreenConfig, *, command: str = "",
               progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    ranks = tuple(int(m.group(1)) for s in cfg.sets if (m := _ACT.match(s)))
    trained = tuple(s for s in cfg.sets if not _ACT.match(s))
    # the aux head enters neither the activation screen nor the evaluated model; trained
    # sets train against it as the server's copy (minilm only)
    st = open_setting(cfg.run_dir, device=cfg.device, aux_from_server=bool(trained),
                      threads=cfg.threads, eval_samples=cfg.eval_samples)
    activation = (act_screen.measure(st, ranks, cfg.act_batches, cfg.seed, progress=progress)
                  if ranks else None)
    if not trained:
        assert activation is not None
        return _act_only(Path(out), cfg, st, activation, command)
    asked, cfg = cfg, replace(cfg, sets=trained)
    split, manifest = st.split, st.manifest
    device_layers(split)
    guide.load_device(split, manifest, st.theta0)
    mask = guide.client_mask(manifest)
    needs_guide = any(s.startswith("guided") for s in cfg.sets)
    gx, gy = guide.guide_rows(st, cfg.guide_size, cfg.seed) if needs_guide else (None, None)

    # shard gradient at the start, for rho^2: all LoRA and every LayerNorm / bias
    union = sorted({n for s in cfg.sets if not s.startswith(("guided", "random"))
                    for n, _ in set_params(split, s)}
                   | {n for n, _ in set_params(split, "lora-all")}
                   | {n for n, _ in set_params(split, "lnbias-all")})
    t0 = time.perf_counter()
    grads = shard_gradient(st, union)
    guide.load_device(split, manifest, st.theta0)
    owned = guide.manifest_params(split, manifest)
    names_in_manifest = [spec.name[len("client."):] for spec, p in
                         zip(manifest.params, owned, strict=True) if p is not None]
    g_flat = np.zeros(manifest.num_params, dtype=np.float32)
    for spec, p in zip(manifest.params, owned, strict=True):
        if p is not None:
            g_flat[spec.offset:spec.offset + spec.size] = grads[spec.name[len("client."):]].ravel()
    e_lora = float(sum(float(np.sum(grads[n].astype(np.float64) ** 2))
                       for n in names_in_manifest))
    progress(f"shard gradient: |g_lora|^2 {e_lora:.3e} ({time.perf_counter() - t0:.0f} s)")
    guide_info: dict[str, Any] = {}
    if needs_guide:
        assert gx is not None and gy is not None
        g_guide = guide.mean_grad(split, manifest, st.theta0, gx, gy)
        guide_info = {"guide_size": len(gy), "cos_guide_shard": float(
            g_guide @ g_flat / (np.linalg.norm(g_guide) * np.linalg.norm(g_flat)))}
        progress(f"cos(guide mean gradient, shard gradient) {guide_info['cos_guide_shard']:.3f}")

    signal = signal_check(st, gx, gy)
    progress("mean-gradient cosines (LoRA of the last layer): " + ", ".join(
        f"{k} {v:.3f}" for k, v in signal.items()))
    caches: dict[int, _Cached] = {}

    def cache_for(start: int) -> _Cached:
        if start not in caches:
            xe = st.xe.numpy()
            caches[start] = _Cached(start, prefix(split, st.x, start),
                                    torch.from_numpy(st.x[:, 1].copy()),
                                    prefix(split, xe, start), torch.from_numpy(xe[:, 1].copy()))
        return caches[start]

    start_eval = _evaluate(split, cache_for(-1), st.ye)
    progress(f"step 0 (frozen device): test acc {start_eval['test_accuracy']:.4f}, loss "
             f"{start_eval['test_loss']:.4f}")
    rows = []
    for name in cfg.sets:
        m = _SET.match(name)
        assert m is not None
        kind = m.group(4)
        if kind:  # a subspace of all LoRA, or of the LoRA of the last N layers
            k = int(m.group(5))
            rng = np.random.default_rng([cfg.seed, guide.GUIDE_KEY, k])
            if m.group(7):
                inside = {n for n, _ in set_params(split, f"lora-last{m.group(7)}")}
            else:
                inside = set(names_in_manifest)
            start = _start_of(sorted(inside))
            sel = np.zeros(manifest.num_params, dtype=bool)
            for spec in manifest.params:
                if spec.role == "client" and spec.name[len("client."):] in inside:
                    sel[spec.offset:spec.offset + spec.size] = True
            lo, hi = int(np.flatnonzero(sel)[0]), int(np.flatnonzero(sel)[-1]) + 1
            if kind == "guided":
                assert gx is not None and gy is not None
                gc = _Cached(start, prefix(split, gx, start),
                             torch.from_numpy(np.ascontiguousarray(gx[:, 1])),
                             torch.zeros(0), torch.zeros(0))

                def basis_fn(theta: np.ndarray, k: int = k, gc: _Cached = gc, lo: int = lo,
                             hi: int = hi) -> np.ndarray:
                    assert gy is not None
                    grads = tail_grads(split, manifest, theta, gc.start, gc.h, gc.mask, gy,
                                       lo, hi, cfg.guide_batch)
                    if grads.shape[1] < k:
                        raise ValueError(f"--guide-size {len(gy)} gives {grads.shape[1]} "
                                         f"guide batches, fewer than the rank {k}")
                    out = np.zeros((manifest.num_params, k), dtype=np.float32)
                    out[lo:hi] = zo_guided.orthonormal_basis(grads, k)
                    return out
            else:
                def basis_fn(theta: np.ndarray, k: int = k, rng: np.random.Generator = rng,
                             sel: np.ndarray = sel) -> np.ndarray:
                    return guide.random_basis(sel, k, rng)
            basis0 = basis_fn(st.theta0)
            guide.load_device(split, manifest, st.theta0)
            energy = float(np.sum((basis0.T.astype(np.float64) @ g_flat) ** 2))
            d_set = k
            lrs = tuple(mv / math.sqrt(k) for mv in cfg.moves)
            fn: Callable[[np.ndarray], np.ndarray] | None = basis_fn
        else:
            named = set_params(split, name)
            energy = float(sum(float(np.sum(grads[n].astype(np.float64) ** 2))
                               for n, _ in named))
            d_set = sum(p.numel() for _, p in named)
            start = _start_of([n for n, _ in named])
            lrs, fn = cfg.lrs, None
        rho2 = energy / e_lora
        runs = [_train(st, cfg, name, lr, cache_for(start), start_eval, fn, progress)
                for lr in lrs]
        guide.load_device(split, manifest, st.theta0)
        rows.append(summarise(name, d_set, rho2, runs, start_eval))
        progress(row_md(rows[-1]))
    report = {"workload": "screen", "command": command,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "config": asdict(asked),
              "run": {"model": manifest.model, "cut": manifest.cut,
                      "dataset": st.run["dataset"], "num_params": manifest.num_params,
                      "client_params": int(mask.sum()), "aux_copied": st.copied,
                      "test_samples": len(st.ye), "shard_samples": len(st.y),
                      "batch_size": st.base.batch_size},
              "start": start_eval, "shard_grad_energy_lora": e_lora, **guide_info,
              "signal": signal,
              "rows": rows}
    if activation is not None:
        report["activation"] = activation
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "screen.json").write_text(json.dumps(report, indent=2) + "\n")
    md = screen_markdown(report)
    if activation is not None:
        md += "\n" + "\n".join(act_screen.markdown(activation)) + "\n"
    (out / "screen.md").write_text(md)
    return report
