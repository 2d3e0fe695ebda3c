"""`heron bench --workload accuracy`: every algorithm federated on the same data, model and
cut, over IID and Dirichlet partitions and several seeds, each run a real `heron run`
(embedded broker, server process, device processes).

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

from edge_runtime.runtime import ALGORITHMS

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
    algorithms: tuple[str, ...] = ALGORITHMS
    seeds: tuple[int, ...] = (0, 1, 2)
    devices: int = 5
    rounds: int = 20
    local_steps: int = 40
    model: str = "cnn"
    cut: str | None = None
    device_threads: int = 1
    run_args: tuple[str, ...] = field(default_factory=tuple)  # more `heron run` options

    def __post_init__(self) -> None:
        for name, allowed in (("datasets", DATASETS), ("partitions", PARTITIONS),
                              ("algorithms", ALGORITHMS)):
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
            "--model", cfg.model, "--device-threads", str(cfg.device_threads),
            *cfg.run_args]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if cfg.cut:
        argv += ["--cut", cfg.cut]
    return argv


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
        "cut": summary["cut"],
    }


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
        name = f"{ds}-{part}-{alg}-s{seed}"
        run_dir = out / "runs" / name
        argv = _run_argv(cfg, "mnist" if ds == MNIST_FORMAT else ds, data_dirs[ds], part,
                         alg, seed, run_dir)
        stamp = run_dir / "bench-argv.json"
        fresh = not (reuse and stamp.exists() and (run_dir / "summary.json").exists()
                     and json.loads(stamp.read_text()) == argv[3:])
        started = time.monotonic()
        if fresh:
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise RuntimeError(f"run {name} failed (exit {proc.returncode}): "
                                   f"{proc.stderr.strip()[-1500:]}\nlogs: {run_dir / 'logs'}")
            stamp.write_text(json.dumps(argv[3:]) + "\n")
        res = {"dataset": ds, "partition": part, "algorithm": alg, "seed": seed,
               "run_dir": str(run_dir.relative_to(out)), **_collect(run_dir)}
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
        rows.append({
            "dataset": ds, "partition": part, "algorithm": alg, "seeds": len(rs),
            "acc_mean": statistics.fmean(acc),
            "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "acc_min": min(acc), "acc_max": max(acc),
            "mb_total": statistics.fmean(r["bytes_total"] for r in rs) / 1e6,
            "device_peak_rss_mb": max(rss) if rss else None,
            "device_step_ms": statistics.median(step) if step else None,
        })
    return rows


def checks(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's accuracy targets per (dataset, partition): heron within 1 point of cse-fsl,
    and above frozen by more than the seed spread (heron std + frozen std)."""
    by = {(r["dataset"], r["partition"], r["algorithm"]): r for r in table}
    out = []
    for ds, part in sorted({(r["dataset"], r["partition"]) for r in table}):
        h = by.get((ds, part, "heron"))
        if h is None:
            continue
        c, f = by.get((ds, part, "cse-fsl")), by.get((ds, part, "frozen"))
        if c is not None:
            gap = h["acc_mean"] - c["acc_mean"]
            out.append({"dataset": ds, "partition": part, "check": "heron vs cse-fsl",
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
    lines = [
        f"Accuracy: {cfg['model']} cut {report['runs'][0]['cut']}, {cfg['devices']} devices, "
        f"{cfg['rounds']} rounds of {cfg['local_steps']} local steps{alpha}, seeds "
        f"{', '.join(map(str, cfg['seeds']))}{mnist}."
        + (f" Extra `heron run` options: `{' '.join(cfg['run_args'])}`." if cfg["run_args"]
           else ""),
        "",
        "| data set | partition | algorithm | final test acc % mean ± std (min-max) | "
        "MB communicated | device peak RSS MB | device step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["table"]:
        rss = "" if r["device_peak_rss_mb"] is None else f"{r['device_peak_rss_mb']:.0f}"
        step = "" if r["device_step_ms"] is None else f"{r['device_step_ms']:.2f}"
        name = f"**{r['algorithm']}**" if r["algorithm"] == "heron" else r["algorithm"]
        lines.append(
            f"| {r['dataset']} | {r['partition']} | {name} | {_pct(r['acc_mean'])} ± "
            f"{_pct(r['acc_std'])} ({_pct(r['acc_min'])}-{_pct(r['acc_max'])}) | "
            f"{r['mb_total']:,.1f} | {rss} | {step} |")
    if report.get("checks"):
        lines += ["", "| data set | partition | target | measured (points) | limit | met |",
                  "|---|---|---|---|---|---|"]
        for c in report["checks"]:
            what = ("heron mean - cse-fsl mean >= -1 point" if c["check"] == "heron vs cse-fsl"
                    else "heron mean - frozen mean > heron std + frozen std")
            lines.append(f"| {c['dataset']} | {c['partition']} | {what} | "
                         f"{100 * c['value']:+.2f} | {100 * c['limit']:+.2f} | "
                         f"{'yes' if c['met'] else '**no**'} |")
    lines += ["", "Device peak RSS and step time come from the devices' own telemetry "
              "(psutil/VmHWM, whole process; ONNX Runtime devices for heron and frozen, torch "
              "devices for the others), on a machine shared by all processes of the run."]
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
                x = (np.arange(1, acc.shape[1] + 1) if kind == "rounds" else
                     np.mean([r["bytes_per_round"] for r in rs], axis=0) / 1e6)
                lw = 2.4 if alg == "heron" else 1.3
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
