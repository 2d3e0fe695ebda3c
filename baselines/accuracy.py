"""`heron bench --workload accuracy`: every algorithm federated on the same data, model and
cut, over IID and Dirichlet partitions and several seeds, each run a real `heron run`
(embedded broker, server process, device processes).

``centralized`` is the reference every split algorithm is compared with: the same network
(same zoo model, same seeded initialisation) trained in this process by torch on the union
of the devices' training data, for as many samples as the federation's devices process
(participants x rounds x local steps x batch size), with the server's optimizer and lr. It
does not depend on the partition, so one run per (data set, seed) serves both.

Writes DIR/accuracy.json (every run, every round), DIR/accuracy.md (the table that goes into
BENCHMARKS.md), DIR/accuracy_rounds.png (test accuracy vs round) and DIR/accuracy_bytes.png
(test accuracy vs bytes communicated). Finished runs are kept under DIR/runs/ and reused when
the bench is started again with the same settings, so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.algorithms import ALGORITHMS

CENTRALIZED = "centralized"  # a reference, not a federation: see the module docstring
SUBJECT = "heron"  # the algorithm the report is about (bold row, thick line, the checks)
BENCH_ALGORITHMS = (*ALGORITHMS, CENTRALIZED)
MNIST_FORMAT = "mnist-format"  # a data set in MNIST's idx files: real MNIST, or digits-28
DATASETS = ("digits", MNIST_FORMAT, "sst2")  # sst2: text, for --model minilm
DEFAULT_DATASETS = ("digits", MNIST_FORMAT)
PARTITIONS = ("iid", "dirichlet")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class AccuracyConfig:
    datasets: tuple[str, ...] = DEFAULT_DATASETS
    mnist_dir: str | None = None  # MNIST idx files; None: generate digits-28 in idx format
    partitions: tuple[str, ...] = PARTITIONS
    alpha: float = 0.5
    algorithms: tuple[str, ...] = BENCH_ALGORITHMS
    seeds: tuple[int, ...] = (0, 1, 2)
    devices: int = 5
    rounds: int = 20
    local_steps: int = 40
    model: str | None = None  # None: each data set's `heron run` default (zoo.default_model)
    cut: str | None = None
    device_threads: int = 1
    run_args: tuple[str, ...] = field(default_factory=tuple)  # more `heron run` options

    def __post_init__(self) -> None:
        for name, allowed in (("datasets", DATASETS), ("partitions", PARTITIONS),
                              ("algorithms", BENCH_ALGORITHMS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name} {bad or '(none)'} not allowed; help: choose from "
                                 f"{', '.join(allowed)}")
        for name in ("devices", "rounds", "local_steps", "device_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("need at least one seed")


# -- digits-28: an MNIST-format data set that needs no download --------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as MNIST ships them (big-endian dims, unsigned bytes)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.tobytes())


def make_digits28(out: Path, seed: int = 0, test_fraction: float = 0.25) -> Path:
    """sklearn's 8x8 digits drawn MNIST-style: 28x28 uint8, the digit in a 20x20 box placed
    with a random shift, written as the four MNIST idx files. A different input resolution
    and layout than `digits`, exercising the same loader a user's real MNIST goes through."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    imgs = d.images / 16.0  # (n, 8, 8) in [0, 1]
    n = len(imgs)
    # 8 -> 20 by linear interpolation along each axis
    grid = np.linspace(0, 7, 20)
    lo = np.floor(grid).astype(int)
    hi = np.minimum(lo + 1, 7)
    w = grid - lo
    rows = imgs[:, lo, :] * (1 - w)[None, :, None] + imgs[:, hi, :] * w[None, :, None]
    big = rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]
    canvas = np.zeros((n, 28, 28), np.float64)
    shifts = rng.integers(0, 9, size=(n, 2))  # top-left corner within 0..8
    for i in range(n):
        r, c = shifts[i]
        canvas[i, r:r + 20, c:c + 20] = big[i]
    images = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    order = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / "train-images-idx3-ubyte", images[train])
    write_idx(out / "train-labels-idx1-ubyte", d.target[train])
    write_idx(out / "t10k-images-idx3-ubyte", images[test])
    write_idx(out / "t10k-labels-idx1-ubyte", d.target[test])
    return out


# -- running ---------------------------------------------------------------------------------
def _run_argv(cfg: AccuracyConfig, dataset: str, data_dir: str | None, partition: str,
              algorithm: str, seed: int, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "heron", "run", "--out", str(out), "--overwrite",
            "--algorithm", algorithm, "--dataset", dataset, "--partition", partition,
            "--alpha", str(cfg.alpha), "--seed", str(seed), "--devices", str(cfg.devices),
            "--rounds", str(cfg.rounds), "--local-steps", str(cfg.local_steps),
            "--device-threads", str(cfg.device_threads), *cfg.run_args]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if cfg.model:
        argv += ["--model", cfg.model]
    if cfg.cut:
        argv += ["--cut", cfg.cut]
    return argv


@dataclass(frozen=True)
class CentralizedSpec:
    """One centralized torch training job, as a federation's run options describe it."""

    dataset: str
    data_dir: str | None
    seed: int
    model: str | None  # None: zoo.default_model of the data set
    cut: str | None  # the split does not change the network; recorded for the report
    steps: int
    steps_per_round: int  # evaluate after as many samples as one federated round processes
    batch_size: int
    optimizer: str
    lr: float
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)


def centralized_spec(run_argv: Sequence[str]) -> CentralizedSpec:
    """The centralized twin of `heron run RUN_ARGV`: same data, model, initialisation seed and
    batch size, as many samples as its devices process, the server's optimizer and lr."""
    from heron.cli import build_parser
    from heron.cli.options import dataset_options, model_options

    args = build_parser().parse_args(["run", *run_argv])
    participants = args.per_round or args.devices
    return CentralizedSpec(
        dataset=args.dataset, data_dir=args.data_dir, seed=args.seed, model=args.model,
        cut=args.cut, steps=participants * args.rounds * args.local_steps,
        steps_per_round=participants * args.local_steps, batch_size=args.batch_size,
        optimizer=args.server_optimizer, lr=args.server_lr,
        dataset_options=dataset_options(args), model_options=model_options(args))


def train_centralized(spec: CentralizedSpec) -> dict[str, Any]:
    """Train the whole network by backprop on the whole training split, epoch-shuffled, and
    evaluate it on the test split after every round's worth of samples."""
    from torch import nn

    from exporter.zoo import build_split, default_model
    from heron_data.datasets import load_dataset
    from server.trainer import ServerTrainer, evaluate

    t0 = time.monotonic()
    ds = load_dataset(spec.dataset, spec.data_dir, seed=spec.seed, **spec.dataset_options)
    model = spec.model or default_model(ds.input_shape, ds.input_dtype)
    split = build_split(model, ds.input_shape, ds.num_classes, cut=spec.cut, seed=spec.seed,
                        **spec.model_options)
    # the server's own trainer, fed raw inputs: the same optimizer, lr and step
    trainer = ServerTrainer(nn.Sequential(split.client, split.server), optimizer=spec.optimizer,
                            lr=spec.lr, smashed_shape=ds.input_shape, num_classes=ds.num_classes)
    rng = np.random.default_rng(spec.seed)
    n = len(ds.y_train)
    batch = min(spec.batch_size, n)
    order, pos = rng.permutation(n), 0
    accuracies = []
    for step in range(1, spec.steps + 1):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch]
        pos += batch
        trainer.train_step(ds.x_train[idx], ds.y_train[idx])
        if step % spec.steps_per_round == 0 or step == spec.steps:
            accuracies.append(evaluate(split.client, split.server, ds.x_test, ds.y_test).accuracy)
    return {
        "final_test_accuracy": accuracies[-1],
        "test_accuracy_per_round": accuracies,
        "bytes_per_round": None, "bytes_total": None,  # no federation: nothing communicated
        "device_peak_rss_mb": None, "device_step_ms_median": None,
        "wall_seconds": round(time.monotonic() - t0, 3),
        "model": model, "cut": split.cut,
        "samples": spec.steps * batch, "train_samples": n,
    }


def _collect(out: Path) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rss = [v for r in records for v in r["device_peak_rss_mb"].values() if v is not None]
    steps = [v for r in records for v in r["device_step_ms"].values() if v is not None]
    return {
        "final_test_accuracy": summary["final_test_accuracy"],
        "test_accuracy_per_round": [r["test_accuracy"] for r in records],
        "bytes_per_round": [r["bytes_up"] + r["bytes_down"] for r in records],
        "bytes_total": summary["bytes_up"] + summary["bytes_down"],
        "device_peak_rss_mb": max(rss) if rss else None,
        "device_step_ms_median": statistics.median(steps) if steps else None,
        "wall_seconds": summary["wall_seconds"],
        "model": summary["model"],
        "cut": summary["cut"],
    }


def _federation(argv: list[str], run_dir: Path, name: str, reuse: bool
                ) -> tuple[dict[str, Any], bool]:
    stamp = run_dir / "bench-argv.json"
    fresh = not (reuse and stamp.exists() and (run_dir / "summary.json").exists()
                 and json.loads(stamp.read_text()) == argv[3:])
    if fresh:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"run {name} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-1500:]}\nlogs: {run_dir / 'logs'}")
        stamp.write_text(json.dumps(argv[3:]) + "\n")
    return _collect(run_dir), fresh


def _centralized(spec: CentralizedSpec, run_dir: Path, reuse: bool
                 ) -> tuple[dict[str, Any], bool]:
    path = run_dir / "centralized.json"
    want = json.loads(json.dumps(asdict(spec)))  # as it reads back from JSON
    if reuse and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("spec") == want:
            return saved["result"], False
    result = train_centralized(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"spec": want, "result": result}, indent=2) + "\n")
    return result, True


def run_accuracy(out: str | Path, cfg: AccuracyConfig, *, command: str | None = None,
                 reuse: bool = True,
                 progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep (or reuse finished runs) and write the report files into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dirs: dict[str, str | None] = {"digits": None, "sst2": None}
    if MNIST_FORMAT in cfg.datasets:
        data_dirs[MNIST_FORMAT] = cfg.mnist_dir or str(make_digits28(out / "data" / "digits28"))
    mnist_source = "MNIST idx files from " + cfg.mnist_dir if cfg.mnist_dir else \
        "digits-28: sklearn digits drawn 28x28 with random shifts, as MNIST idx files"
    plan = [(ds, part, alg, seed) for ds in cfg.datasets for part in cfg.partitions
            for seed in cfg.seeds for alg in cfg.algorithms]
    t0 = time.monotonic()
    runs = []
    for i, (ds, part, alg, seed) in enumerate(plan, start=1):
        # the centralized reference trains on the union of the shards: one serves every partition
        name = f"{ds}-{alg}-s{seed}" if alg == CENTRALIZED else f"{ds}-{part}-{alg}-s{seed}"
        run_dir = out / "runs" / name
        argv = _run_argv(cfg, "mnist" if ds == MNIST_FORMAT else ds, data_dirs[ds], part,
                         "heron" if alg == CENTRALIZED else alg, seed, run_dir)
        started = time.monotonic()
        if alg == CENTRALIZED:
            collected, fresh = _centralized(centralized_spec(argv[4:]), run_dir, reuse)
        else:
            collected, fresh = _federation(argv, run_dir, name, reuse)
        res = {"dataset": ds, "partition": part, "algorithm": alg, "seed": seed,
               "run_dir": str(run_dir.relative_to(out)), **collected}
        runs.append(res)
        elapsed = time.monotonic() - t0
        eta = elapsed / i * (len(plan) - i)
        progress(f"  [{i:>3}/{len(plan)}] {name:36s} final test acc "
                 f"{res['final_test_accuracy']:.4f}  "
                 f"{'ran' if fresh else 'reused'} {time.monotonic() - started:5.1f} s, "
                 f"~{eta / 60:.1f} min left")
    report = {
        "workload": "accuracy",
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "config": {**asdict(cfg), "mnist_format_source": mnist_source},
        "runs": runs,
        "table": aggregate(runs),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    report["checks"] = checks(report["table"])
    from baselines.profile import machine

    report["machine"] = machine()
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "accuracy.md").write_text(markdown(report))
    report["plots"] = plot_accuracy(report, out)
    return report


# -- reporting (pure) ------------------------------------------------------------------------
def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation and range over seeds, per (dataset, partition, algorithm)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["partition"], r["algorithm"]), []).append(r)
    rows = []
    for (ds, part, alg), rs in groups.items():
        acc = [r["final_test_accuracy"] for r in rs]
        rss = [r["device_peak_rss_mb"] for r in rs if r["device_peak_rss_mb"] is not None]
        step = [r["device_step_ms_median"] for r in rs if r["device_step_ms_median"] is not None]
        sent = [r["bytes_total"] for r in rs if r["bytes_total"] is not None]
        rows.append({
            "dataset": ds, "partition": part, "algorithm": alg, "seeds": len(rs),
            "acc_mean": statistics.fmean(acc),
            "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "acc_min": min(acc), "acc_max": max(acc),
            "mb_total": statistics.fmean(sent) / 1e6 if sent else None,
            "device_peak_rss_mb": max(rss) if rss else None,
            "device_step_ms": statistics.median(step) if step else None,
        })
    return rows


def checks(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's accuracy targets per (dataset, partition): heron within 1 point of cse-fsl
    and of the centralized reference, and above frozen by more than the seed spread (heron
    std + frozen std)."""
    by = {(r["dataset"], r["partition"], r["algorithm"]): r for r in table}
    out = []
    for ds, part in sorted({(r["dataset"], r["partition"]) for r in table}):
        h = by.get((ds, part, SUBJECT))
        if h is None:
            continue
        f = by.get((ds, part, "frozen"))
        for ref in ("cse-fsl", CENTRALIZED):
            c = by.get((ds, part, ref))
            if c is not None:
                gap = h["acc_mean"] - c["acc_mean"]
                out.append({"dataset": ds, "partition": part, "check": f"heron vs {ref}",
                            "value": gap, "limit": -0.01, "met": gap >= -0.01 - 1e-9})
        if f is not None:
            gap = h["acc_mean"] - f["acc_mean"]
            spread = h["acc_std"] + f["acc_std"]
            out.append({"dataset": ds, "partition": part, "check": "heron vs frozen",
                        "value": gap, "limit": spread, "met": gap > spread})
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    alpha = (f", Dirichlet alpha {cfg['alpha']}" if "dirichlet" in cfg["partitions"] else "")
    mnist = (f"; {MNIST_FORMAT} = {cfg['mnist_format_source']}" if MNIST_FORMAT in cfg["datasets"]
             else "")
    models: dict[str, str] = {}
    for r in report["runs"]:
        if r["algorithm"] != CENTRALIZED or r["dataset"] not in models:
            models[r["dataset"]] = f"{r.get('model', cfg['model'])} cut {r['cut']}"
    lines = [
        f"Accuracy: {'; '.join(f'{ds} {m}' for ds, m in models.items())}, "
        f"{cfg['devices']} devices, {cfg['rounds']} rounds of {cfg['local_steps']} local "
        f"steps{alpha}, seeds {', '.join(map(str, cfg['seeds']))}{mnist}."
        + (f" Extra `heron run` options: `{' '.join(cfg['run_args'])}`." if cfg["run_args"]
           else ""),
        "",
        "| data set | partition | algorithm | final test acc % mean ± std (min-max) | "
        "MB communicated | device peak RSS MB | device step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["table"]:
        rss = "" if r["device_peak_rss_mb"] is None else f"{r['device_peak_rss_mb']:.0f}"
        mb = "" if r["mb_total"] is None else f"{r['mb_total']:,.1f}"
        step = "" if r["device_step_ms"] is None else f"{r['device_step_ms']:.2f}"
        name = f"**{r['algorithm']}**" if r["algorithm"] == SUBJECT else r["algorithm"]
        lines.append(
            f"| {r['dataset']} | {r['partition']} | {name} | {_pct(r['acc_mean'])} ± "
            f"{_pct(r['acc_std'])} ({_pct(r['acc_min'])}-{_pct(r['acc_max'])}) | "
            f"{mb} | {rss} | {step} |")
    if report.get("checks"):
        lines += ["", "| data set | partition | target | measured (points) | limit | met |",
                  "|---|---|---|---|---|---|"]
        for c in report["checks"]:
            ref = c["check"].removeprefix("heron vs ")
            what = ("heron mean - frozen mean > heron std + frozen std" if ref == "frozen"
                    else f"heron mean - {ref} mean >= -1 point")
            lines.append(f"| {c['dataset']} | {c['partition']} | {what} | "
                         f"{100 * c['value']:+.2f} | {100 * c['limit']:+.2f} | "
                         f"{'yes' if c['met'] else '**no**'} |")
    lines += ["", "Device peak RSS and step time come from the devices' own telemetry "
              "(psutil/VmHWM, whole process; ONNX Runtime devices for heron and frozen, torch "
              "devices for the others), on a machine shared by all processes of the run."]
    if any(r["algorithm"] == CENTRALIZED for r in report["table"]):
        lines += ["", "centralized: the same network and initialisation trained by torch on "
                  "the union of the devices' training data (so one value serves both "
                  "partitions), for as many samples as the devices process (participants x "
                  "rounds x local steps x batch size), with the server's optimizer and lr; "
                  "evaluated after each round's worth of samples."]
    return "\n".join(lines) + "\n"


def plot_accuracy(report: dict[str, Any], out: Path) -> list[str]:
    """Accuracy vs round and vs bytes, one panel per (data set, partition); [] without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    panels = sorted({(r["dataset"], r["partition"]) for r in report["runs"]})
    algs = list(dict.fromkeys(r["algorithm"] for r in report["runs"]))
    colors = dict(zip(algs, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    paths = []
    for kind in ("rounds", "bytes"):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
        for ax, (ds, part) in zip(axes[0], panels, strict=True):
            for alg in algs:
                rs = [r for r in report["runs"] if (r["dataset"], r["partition"],
                                                    r["algorithm"]) == (ds, part, alg)]
                if not rs:
                    continue
                acc = np.array([r["test_accuracy_per_round"] for r in rs])
                if kind == "bytes" and alg == CENTRALIZED:  # nothing sent: its final level
                    ax.axhline(acc[:, -1].mean(), label=alg, color=colors.get(alg), ls="--")
                    continue
                x = (np.arange(1, acc.shape[1] + 1) if kind == "rounds" else
                     np.mean([r["bytes_per_round"] for r in rs], axis=0) / 1e6)
                lw = 2.4 if alg == SUBJECT else 1.3
                ax.plot(x, acc.mean(0), label=alg, color=colors.get(alg), lw=lw)
                ax.fill_between(x, acc.min(0), acc.max(0), color=colors.get(alg), alpha=0.15)
            ax.set_title(f"{ds}, {part}")
            ax.set_xlabel("round" if kind == "rounds" else "MB communicated (up + down)")
            if kind == "bytes":
                ax.set_xscale("log")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("test accuracy (mean over seeds, band = min-max)")
        fig.tight_layout()
        path = out / f"accuracy_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths
