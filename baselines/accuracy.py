"""`heron bench --workload accuracy`: every algorithm federated on the same data, model and
cut, over IID and Dirichlet partitions and several seeds, each run a real `heron run`
(embedded broker, server process, device processes).

``centralized`` is the reference every split algorithm is compared with
(`baselines.centralized`); ``mnist-format`` is real MNIST, or digits-28 where none is given,
and ``cifar-format`` real CIFAR-10, or digits-32c (`baselines.generated_data`); the table, checks
and plots are `baselines.accuracy_report`'s.

Writes DIR/accuracy.json (every run, every round), DIR/accuracy.md (the table that goes into
BENCHMARKS.md), DIR/accuracy_rounds.png (test accuracy vs round) and DIR/accuracy_bytes.png
(test accuracy vs bytes communicated). Finished runs are kept under DIR/runs/ and reused when
the bench is started again with the same settings, so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from baselines.accuracy_report import (
    TAIL,
    aggregate,
    checks,
    markdown,
    paired,
    plot_accuracy,
)
from baselines.centralized import CENTRALIZED, CentralizedSpec, centralized_spec, train_centralized
from baselines.generated_data import CIFAR_FORMAT, MNIST_FORMAT, make_digits28, make_digits32c
from edge_runtime.algorithms import ALGORITHMS

BENCH_ALGORITHMS = (*ALGORITHMS, CENTRALIZED)
DATASETS = ("digits", MNIST_FORMAT, CIFAR_FORMAT, "sst2")  # sst2: text, for --model minilm
RUN_DATASET = {MNIST_FORMAT: "mnist", CIFAR_FORMAT: "cifar10"}  # `heron run --dataset`
DEFAULT_DATASETS = ("digits", MNIST_FORMAT)
PARTITIONS = ("iid", "dirichlet")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class AccuracyConfig:
    datasets: tuple[str, ...] = DEFAULT_DATASETS
    mnist_dir: str | None = None  # MNIST idx files; None: generate digits-28 in idx format
    cifar_dir: str | None = None  # CIFAR-10 python batches; None: generate digits-32c
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
    if CIFAR_FORMAT in cfg.datasets:
        data_dirs[CIFAR_FORMAT] = cfg.cifar_dir or str(make_digits32c(out / "data" / "digits32c"))
    mnist_source = "MNIST idx files from " + cfg.mnist_dir if cfg.mnist_dir else \
        "digits-28: sklearn digits drawn 28x28 with random shifts, as MNIST idx files"
    cifar_source = "CIFAR-10 batches from " + cfg.cifar_dir if cfg.cifar_dir else \
        "digits-32c: sklearn digits drawn 32x32 in colour, as CIFAR-10 python batches"
    plan = [(ds, part, alg, seed) for ds in cfg.datasets for part in cfg.partitions
            for seed in cfg.seeds for alg in cfg.algorithms]
    t0 = time.monotonic()
    runs = []
    for i, (ds, part, alg, seed) in enumerate(plan, start=1):
        # the centralized reference trains on the union of the shards: one serves every partition
        name = f"{ds}-{alg}-s{seed}" if alg == CENTRALIZED else f"{ds}-{part}-{alg}-s{seed}"
        run_dir = out / "runs" / name
        argv = _run_argv(cfg, RUN_DATASET.get(ds, ds), data_dirs[ds], part,
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
        "config": {**asdict(cfg), "mnist_format_source": mnist_source,
                   "cifar_format_source": cifar_source},
        "runs": runs,
        "table": aggregate(runs),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    report["checks"] = checks(report["table"])
    report["paired"] = paired(runs)
    report["paired_tail"] = paired(runs, tail=TAIL)
    from baselines.profile import machine

    report["machine"] = machine()
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "accuracy.md").write_text(markdown(report))
    report["plots"] = plot_accuracy(report, out)
    return report
