"""Device progress per local step: how far ZO and first-order steps move the whole model.

The accuracy workload can only say *whether* heron ends above `frozen`; this says why or
why not, with everything but the device's optimizer held fixed. From a finished federation
(its bundle, shards, run.json and checkpoint.pt) the server part stays as trained, and only
the device part is trained from the final global weights on one device's shard:

- ``heron``: edge_runtime's own ``train_round`` (ONNX Runtime, the run's ZO settings);
- ``cse-fsl``: ``train_round_torch`` (backprop of the aux loss, Adam at the FO device lr).

Both draw the same batches (same sampler seeds) and restart their optimizer state every
``every`` steps, as a round does. After each ``every`` steps, on the run's test set:
accuracy and loss of server(client(x)) (what the device's update does to the evaluated
model) and the aux head's loss (the device's own objective). Step 0 is the frozen device.

With ``aux_from_server`` the aux head is first replaced by the server's same-named tensors
(``--aux-from-server``), so the device's loss is the server's and its gradient is meaningful
from step 1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from devices.torch_device import split_for, train_round_torch
from edge_runtime.bundle import load_bundle
from edge_runtime.manifest import Manifest
from edge_runtime.protocol import OptimizerConfig, TrainConfig
from edge_runtime.runtime import LocalModel, train_round
from edge_runtime.zo_guided import DIRECTIONS
from exporter.export import aux_from_server as aux_from_server_fn
from exporter.export import load_flat_into
from exporter.zoo import SplitModel
from heron_data.datasets import load_dataset

ARMS = ("heron", "cse-fsl", "noise", "guide-only")
FO_LR = 1e-3  # heron run's default device lr for the first-order baselines
# --device heldout: the last HELDOUT_ROWS held-out rows (dev.tsv) as the shard of a device
# the server never trained on (a federation's devices' shards are what it fit); the guide
# set is drawn from the other held-out rows
HELDOUT = "heldout"
HELDOUT_ROWS = 500
# run.json key -> load_dataset keyword (the text options `heron run` forwards)
_DATASET_KEYS = {"limit": "limit", "text_column": "text_column", "label_column": "label_column",
                 "max_length": "max_length", "minilm_dir": "model_dir"}


@dataclass(frozen=True)
class ProgressConfig:
    run_dir: str
    steps: int = 400
    every: int | None = None  # steps between evaluations and optimizer restarts (run's h)
    device: str = "dev-0"  # whose shard trains
    aux_from_server: bool = False
    arms: tuple[str, ...] = ("heron", "cse-fsl")
    heron_lr: float | None = None  # default: the run's device lr
    heron_q: int | None = None  # ZO directions per step (default: the run's q)
    heron_mu: float | None = None  # ZO smoothing (default: the run's mu)
    heron_optimizer: str | None = None  # adam | sgd (default: the run's)
    fo_lr: float = FO_LR
    threads: int = 1
    eval_samples: int | None = None  # default: the whole test set
    # issue 15: a trained subset and guided directions (baselines.race); None: as a round
    train_set: str | None = None  # lora-all | lora-lastN: only these client tensors train
    heron_directions: tuple[str, ...] = ("random",)  # one heron arm per mode
    guided_lr: float | None = None  # default: heron lr x (d_set + 2) / (guide_rank + 2)
    guide_size: int = 256
    guide_rank: int = 16
    guide_batch: int = 16
    guide_every: int | None = None  # default: every
    guide_alpha: float = 0.0
    seed: int | None = None  # default: the run's
    seeds: tuple[int, ...] = ()  # several: the race, paired over them (baselines.race)
    eval_every: int | None = None  # default: every
    fo_steps: int | None = None  # cse-fsl / guide-only stop here (default: steps)
    # activation directions (baselines.act_race): rank of each weight's input basis and
    # steps between its refreshes from the current batch
    act_rank: int = 4
    act_refresh: int = 20

    def __post_init__(self) -> None:
        if self.steps < 1 or (self.every is not None and self.every < 1):
            raise ValueError(f"--steps and --every must be >= 1, got {self.steps}, {self.every}")
        bad = sorted(set(self.arms) - set(ARMS))
        if bad or not self.arms:
            raise ValueError(f"arms must be among {', '.join(ARMS)}, got {list(self.arms)}")
        bad = sorted(set(self.heron_directions) - set(DIRECTIONS))
        if bad or not self.heron_directions:
            raise ValueError(f"--heron-directions must be among {', '.join(DIRECTIONS)}, got "
                             f"{list(self.heron_directions)}")
        if "activation" in self.heron_directions:
            if self.train_set is not None or "guided" in self.heron_directions:
                raise ValueError("--heron-directions activation races on the whole device "
                                 "(baselines.act_race): no --train-set, no guided arm")
            if sorted(set(self.arms) - {"heron", "cse-fsl"}):
                raise ValueError("the activation race's arms are heron and cse-fsl")
            if self.act_rank < 1 or self.act_refresh < 1:
                raise ValueError("--act-rank and --act-refresh must be >= 1")
        subset_only = sorted({"noise", "guide-only"} & set(self.arms)) + (
            ["--heron-directions guided"] if "guided" in self.heron_directions else []) + (
            ["--race-seeds"] if self.seeds and "activation" not in self.heron_directions
            else [])
        if self.train_set is None and subset_only:
            raise ValueError(f"{', '.join(subset_only)} need --train-set (lora-all or "
                             "lora-lastN, with --aux-from-server)")
        if self.train_set is not None:
            from baselines.race import check_train_set

            check_train_set(self.train_set)
            if not self.aux_from_server:
                raise ValueError("--train-set trains against the aux head as the server's "
                                 "copy; help: add --aux-from-server")
        if "noise" in self.arms and not ("heron" in self.arms and "guided" in
                                         self.heron_directions and self.arms.index("heron")
                                         < self.arms.index("noise")):
            raise ValueError("the noise arm replays the guided heron arm; help: --arms "
                             "heron,noise,... with --heron-directions guided")
        for name in ("guide_size", "guide_rank", "guide_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= self.guide_alpha < 1.0:
            raise ValueError(f"--guide-alpha must be in [0, 1), got {self.guide_alpha}")


def _load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    need = [run_dir / n for n in ("run.json", "checkpoint.pt", "bundle", "shards")]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise ValueError(f"{run_dir} is not a finished federation (missing {', '.join(missing)});"
                         " help: pass the --out directory of a `heron run`")
    try:
        run = json.loads((run_dir / "run.json").read_text())
        ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    except Exception as exc:  # torch raises its own types for a truncated or foreign file
        raise ValueError(f"cannot read {run_dir}'s run.json or checkpoint.pt: "
                         f"{type(exc).__name__}: {exc}; help: pass the --out directory of a "
                         "finished `heron run`") from exc
    missing = sorted({"server_state", "device_weights", "train_config"} - set(ckpt))
    if missing or not isinstance(run, dict) or "dataset" not in run:
        raise ValueError(f"{run_dir} is not a heron run directory (checkpoint lacks {missing} "
                         "or run.json names no dataset)")
    return run, ckpt


def _evaluate(split: SplitModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test accuracy and loss of server(client(x)), and the aux head's loss, in batches."""
    correct, loss, aux_loss = 0, 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), 128):
            xb, yb = x[i:i + 128], y[i:i + 128]
            h = split.client(xb)
            logits = split.server(h)
            correct += int((logits.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            aux_loss += float(F.cross_entropy(split.aux(h), yb, reduction="sum"))
    n = len(y)
    return {"test_accuracy": correct / n, "test_loss": loss / n, "aux_test_loss": aux_loss / n}


def _moved(manifest: Manifest, theta0: np.ndarray, theta: np.ndarray) -> dict[str, float]:
    """L2 distance travelled by the client and the aux weights: where the update went."""
    out = {}
    for role in ("client", "aux"):
        idx = [np.arange(p.offset, p.offset + p.size) for p in manifest.params
               if p.role == role]
        sel = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
        out[f"{role}_moved"] = float(np.linalg.norm(theta[sel] - theta0[sel]))
    return out


@dataclass
class Setting:
    """A finished federation opened for a server-fixed experiment: the split with the
    server's final weights, the device's starting vector, one device's shard, the test
    set and the held-out rows (``dev``) no device received."""

    run: dict[str, Any]
    bundle: Any
    manifest: Manifest
    split: SplitModel
    theta0: np.ndarray
    copied: list[str]
    base: TrainConfig
    x: np.ndarray  # the device's shard
    y: np.ndarray
    xe: torch.Tensor  # the test set (eval_samples of it)
    ye: torch.Tensor
    x_dev: np.ndarray | None  # held-out rows (SST-2: dev.tsv), the guide set's pool
    y_dev: np.ndarray | None


def open_setting(run_dir: str | Path, *, device: str = "dev-0", aux_from_server: bool = False,
                 threads: int = 1, eval_samples: int | None = None) -> Setting:
    run_dir = Path(run_dir)
    run, ckpt = _load_run(run_dir)
    torch.set_num_threads(threads)
    bundle = load_bundle(run_dir / "bundle")
    manifest = bundle.manifest
    split = split_for(manifest)
    split.server.load_state_dict(ckpt["server_state"])
    for m in (split.client, split.aux, split.server):
        m.eval()
    theta0 = np.asarray(ckpt["device_weights"], dtype=np.float32)[:manifest.num_params]
    copied: list[str] = []
    if aux_from_server:
        theta0, copied = aux_from_server_fn(split.server, manifest, theta0)
        if not copied:
            raise ValueError(f"--aux-from-server: no aux tensor of {manifest.model} has a "
                             "same-named server tensor")
    base = TrainConfig.from_json(ckpt["train_config"])
    opts = {kw: run[k] for k, kw in _DATASET_KEYS.items() if run.get(k) is not None}
    if run.get("no_header"):
        opts["no_header"] = True
    data = load_dataset(run["dataset"], run.get("data_dir"), seed=int(run["seed"]), **opts)
    n_eval = len(data.y_test) if eval_samples is None else min(eval_samples, len(data.y_test))
    xe = torch.from_numpy(np.ascontiguousarray(data.x_test[:n_eval]))
    ye = torch.from_numpy(data.y_test[:n_eval].astype(np.int64))
    x_dev = data.x_dev
    y_dev = None if data.y_dev is None else data.y_dev.astype(np.int64)
    if device == HELDOUT and x_dev is None and y_dev is None and len(data.y_test) >= 2 * 100:
        # no held-out rows (image data sets): the first half of the test set is the device's
        # shard, the second half the test set
        half = len(data.y_test) // 2
        n_eval = min(n_eval, len(data.y_test) - half)
        xe = torch.from_numpy(np.ascontiguousarray(data.x_test[half:half + n_eval]))
        ye = torch.from_numpy(data.y_test[half:half + n_eval].astype(np.int64))
        x, y = data.x_test[:half], data.y_test[:half].astype(np.int64)
        return Setting(run, bundle, manifest, split, theta0, copied, base, x, y, xe, ye,
                       None, None)
    if device == HELDOUT:  # a device whose data the server never trained on
        if x_dev is None or y_dev is None or len(y_dev) < 2 * HELDOUT_ROWS:
            raise ValueError(f"--device {HELDOUT} needs at least {2 * HELDOUT_ROWS} held-out "
                             "rows (SST-2: dev.tsv next to train.tsv)")
        x, y = x_dev[-HELDOUT_ROWS:], y_dev[-HELDOUT_ROWS:]
        x_dev, y_dev = x_dev[:-HELDOUT_ROWS], y_dev[:-HELDOUT_ROWS]  # the guide's pool
        return Setting(run, bundle, manifest, split, theta0, copied, base, x, y, xe, ye,
                       x_dev, y_dev)
    shard_path = run_dir / "shards" / f"{device}.npz"
    if not shard_path.exists():
        raise ValueError(f"no shard {shard_path}; help: --device names one of "
                         f"{sorted(p.stem for p in (run_dir / 'shards').glob('*.npz'))} or "
                         f"{HELDOUT}")
    with np.load(shard_path) as shard:
        x, y = shard["x"], shard["y"].astype(np.int64)
    return Setting(run, bundle, manifest, split, theta0, copied, base, x, y, xe, ye,
                   x_dev, y_dev)


def run_progress(out: str | Path, cfg: ProgressConfig, *, command: str = "",
                 progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    if "activation" in cfg.heron_directions:  # any model, whole device, own harness
        from baselines.act_race import run_act_race

        return run_act_race(out, cfg, command=command, progress=progress)
    if cfg.seeds:  # the race: one subset progress per seed, then paired statistics
        from baselines.race import write_race

        reports = []
        for seed in cfg.seeds:
            one = replace(cfg, seeds=(), seed=seed)
            done = Path(out) / f"seed-{seed}" / "progress.json"
            if done.exists():  # reuse a seed finished with the same settings
                old = json.loads(done.read_text())
                if old.get("config") == json.loads(json.dumps(asdict(one))):
                    progress(f"--- seed {seed}: reusing {done}")
                    reports.append(old)
                    continue
            progress(f"--- seed {seed}")
            reports.append(run_progress(Path(out) / f"seed-{seed}", one,
                                        command=command, progress=progress))
        summary = write_race(Path(out), reports)
        return {"workload": "progress", "race": summary, "seeds": reports}
    if cfg.train_set is not None:
        return _run_subset_progress(out, cfg, command=command, progress=progress)
    st = open_setting(cfg.run_dir, device=cfg.device, aux_from_server=cfg.aux_from_server,
                      threads=cfg.threads, eval_samples=cfg.eval_samples)
    run, bundle, manifest, split = st.run, st.bundle, st.manifest, st.split
    theta0, copied, base = st.theta0, st.copied, st.base
    x, y, xe, ye = st.x, st.y, st.xe, st.ye
    n_eval = len(ye)
    every = cfg.every or base.local_steps
    model = LocalModel(bundle, threads=cfg.threads) if "heron" in cfg.arms else None

    load_flat_into(split, manifest, theta0)
    start = _evaluate(split, xe, ye)
    progress(f"step 0 (frozen device): test acc {start['test_accuracy']:.4f}, loss "
             f"{start['test_loss']:.4f}, aux loss {start['aux_test_loss']:.4f}")
    curves: dict[str, list[dict[str, Any]]] = {}
    heron_cfg: TrainConfig | None = None
    ms: dict[str, float] = {}
    for arm in cfg.arms:
        if arm == "heron":
            arm_cfg = replace(
                base, algorithm="heron", local_steps=every,
                zo=replace(base.zo, q=cfg.heron_q or base.zo.q, mu=cfg.heron_mu or base.zo.mu),
                optimizer=replace(base.optimizer, lr=cfg.heron_lr or base.optimizer.lr,
                                  name=cfg.heron_optimizer or base.optimizer.name))
            heron_cfg = arm_cfg
        else:
            arm_cfg = replace(base, algorithm="cse-fsl", local_steps=every,
                              optimizer=OptimizerConfig(name="adam", lr=cfg.fo_lr))
        theta, spent = theta0.copy(), 0.0
        points = [{"step": 0, **start, **_moved(manifest, theta0, theta0)}]
        for r in range(-(-cfg.steps // every)):
            t0 = time.perf_counter()
            if arm == "heron":
                assert model is not None
                theta = train_round(model, theta, x, y, arm_cfg, round_idx=r,
                                    device_id=cfg.device).theta
            else:
                theta = train_round_torch(split, manifest, theta, x, y, arm_cfg, round_idx=r,
                                          device_id=cfg.device).theta
            spent += time.perf_counter() - t0
            load_flat_into(split, manifest, theta)
            for m in (split.client, split.aux, split.server):
                m.eval()
            point = {"step": (r + 1) * every, **_evaluate(split, xe, ye),
                     **_moved(manifest, theta0, theta)}
            points.append(point)
            progress(f"{arm} step {point['step']}: test acc {point['test_accuracy']:.4f}, "
                     f"loss {point['test_loss']:.4f}, aux loss {point['aux_test_loss']:.4f}")
        curves[arm] = points
        ms[arm] = 1000.0 * spent / (len(points) - 1) / every
        load_flat_into(split, manifest, theta0)
    report = {"workload": "progress", "command": command,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "config": asdict(cfg),
              "heron_config": heron_cfg.to_json() if heron_cfg else None,
              "run": {"model": manifest.model, "cut": manifest.cut, "dataset": run["dataset"],
                      "num_params": manifest.num_params, "every": every,
                      "train_config": base.to_json(), "aux_copied": copied,
                      "test_samples": n_eval, "shard_samples": len(y)},
              "step_ms": {k: round(v, 2) for k, v in ms.items()}, "curves": curves}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "progress.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "progress.md").write_text(progress_markdown(report))
    return report


def _run_subset_progress(out: str | Path, cfg: ProgressConfig, *, command: str,
                         progress: Callable[[str], None]) -> dict[str, Any]:
    from baselines.race import run_subset

    st = open_setting(cfg.run_dir, device=cfg.device, aux_from_server=True,
                      threads=cfg.threads, eval_samples=cfg.eval_samples)
    every = cfg.every or st.base.local_steps
    curves, ms, used = run_subset(st, cfg, st.base, every, progress)
    manifest = st.manifest
    report = {"workload": "progress", "command": command,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "config": asdict(cfg),
              "heron_config": None, "subset": used,
              "run": {"model": manifest.model, "cut": manifest.cut,
                      "dataset": st.run["dataset"], "num_params": manifest.num_params,
                      "every": every, "train_config": st.base.to_json(),
                      "aux_copied": st.copied, "test_samples": len(st.ye),
                      "shard_samples": len(st.y)},
              "step_ms": {k: round(v, 2) for k, v in ms.items()}, "curves": curves}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "progress.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "progress.md").write_text(progress_markdown(report))
    return report


def progress_markdown(report: dict[str, Any]) -> str:
    """One row per evaluation step; per arm: test accuracy, test loss, aux test loss."""
    arms = list(report["curves"])
    r = report["run"]
    lines = [f"{r['model']}/{r['cut']} on {r['dataset']}, d = {r['num_params']}, server fixed; "
             f"{r['shard_samples']} shard samples, {r['test_samples']} test samples; "
             f"optimizer restarted every {r['every']} steps"
             + ("; aux head copied from the server" if r["aux_copied"] else "")
             + ". acc and loss: server(client(x)) on the test set; aux: the device's own "
             "head; moved: L2 distance of the client / aux weights from step 0", "",
             "| step | " + " | ".join(f"{a} acc | {a} loss | {a} aux loss | {a} moved c / a"
                                     for a in arms) + " |",
             "|---:|" + "---:|---:|---:|---:|" * len(arms)]
    h = report.get("heron_config")
    if h:
        z, o = h["zo"], h["optimizer"]
        lines.insert(1, f"heron: {o['name']} lr {o['lr']:g}, mu {z['mu']:g}, q {z['q']}, "
                     f"{z['scheme']} difference, {z.get('perturb', 'full')} perturbation")
    # arms may stop early (--fo-steps): a step an arm did not reach has empty cells
    at = {a: {p["step"]: p for p in report["curves"][a]} for a in arms}
    steps = sorted({s for a in arms for s in at[a]})
    for step in steps:
        cells = []
        for a in arms:
            p = at[a].get(step)
            cells += ["", "", "", ""] if p is None else [
                f"{100 * p['test_accuracy']:.2f}", f"{p['test_loss']:.4f}",
                f"{p['aux_test_loss']:.4f}", f"{p['client_moved']:.3f} / {p['aux_moved']:.3f}"]
        lines.append(f"| {step}{' (frozen)' if step == 0 else ''} | " + " | ".join(cells) + " |")
    lines += ["", "device ms/step (this machine, training only): " + ", ".join(
        f"{a} {v:.1f}" for a, v in report["step_ms"].items()), ""]
    return "\n".join(lines)
