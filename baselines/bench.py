"""`heron bench --workload cost`: every algorithm's device step on one model, cut and batch,
each profiled in its own fresh process, compared against CSE-FSL in the same run.

Writes DIR/cost.json (every profile plus ratios and targets), DIR/cost.md (the table that
goes into BENCHMARKS.md) and DIR/cost.png (peak RSS and step time per algorithm).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from baselines.profile import export_bundle, machine, profile
from baselines.steps import ALGORITHMS
from edge_runtime.algorithms import algorithm

REFERENCE = "cse-fsl"
BLOCK = "heron-block"  # heron with block-wise ZO (--zo-perturb block), a row of its own
ROWS = (*ALGORITHMS, BLOCK)
# The issues' targets (benchmarks, not tests): (key, what, limit). Issue 3 on resnet18
# (default cut, batch 64); issue 4 on minilm. Other models are held to issue 3's.
# Step ratios use mean step times: block-wise steps differ by the block drawn.
TARGETS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "resnet18": (
        ("memory", "heron peak RSS / cse-fsl peak RSS", 0.25),
        ("speed vs forwards", "heron step / its forward passes alone", 1.15),
        ("speed vs cse-fsl", "heron step / cse-fsl step", 0.60),
        ("block speed vs cse-fsl", "heron-block step / cse-fsl step", 0.45),
    ),
    "minilm": (
        ("memory", "heron peak RSS / cse-fsl peak RSS", 0.45),
        ("speed vs cse-fsl", "heron step / cse-fsl step", 0.60),
        ("block speed vs cse-fsl", "heron-block step / cse-fsl step", 0.60),
    ),
}


def run_cost(
    out: str | Path,
    *,
    model: str = "resnet18",
    cut: str | None = None,
    batch: int = 64,
    steps: int = 20,
    warmup: int | None = None,
    threads: int | None = None,
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    algorithms: Sequence[str] = ROWS,
    repeats: int = 1,
    command: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Profile every algorithm and write cost.json, cost.md and cost.png into `out`.

    With `repeats` > 1 the sweep runs that many times, in alternating order, and each
    algorithm keeps its run with the lowest mean step time (all runs stay in the JSON):
    on a shared machine, load from other processes then hits no algorithm alone.
    """
    unknown = [a for a in algorithms if a not in ROWS]
    if unknown or not algorithms:
        raise ValueError(f"unknown algorithms {unknown}; help: choose from {', '.join(ROWS)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {alg: [] for alg in algorithms}
    with tempfile.TemporaryDirectory(prefix="heron-bench-") as tmp:
        bundle = Path(tmp) / "bundle"
        manifest = export_bundle(model, input_shape, num_classes, cut, bundle)
        tail_bundle = Path(tmp) / "tail-bundle"  # heron-tail's: the tail in its weights
        if any(algorithm(a).needs_tail_graph for a in algorithms if a != BLOCK):
            export_bundle(model, input_shape, num_classes, cut, tail_bundle, tail_batch=batch)
        for rep in range(repeats):
            for alg in (algorithms if rep % 2 == 0 else list(reversed(algorithms))):
                res = profile("heron" if alg == BLOCK else alg, model=model, cut=manifest.cut,
                              batch=batch, threads=threads, steps=steps, warmup=warmup,
                              input_shape=input_shape, num_classes=num_classes,
                              bundle_dir=(tail_bundle if alg != BLOCK
                                          and algorithm(alg).needs_tail_graph else bundle),
                              perturb="block" if alg == BLOCK else "full")
                res["algorithm"] = alg
                progress(f"  {alg:11s} step {res['step_ms_median']:9.2f} ms (median of {steps}),"
                         f" {res['step_ms_mean']:9.2f} mean,"
                         f" peak RSS {res['peak_rss_mb']:7.1f} MB, "
                         f"{res['flops_per_step'] / 1e9:7.2f} GFLOPs/step"
                         + (f"  (run {rep + 1}/{repeats})" if repeats > 1 else ""))
                runs[alg].append(res)
    results = []
    for alg in algorithms:
        best = dict(min(runs[alg], key=lambda r: r["step_ms_mean"]))
        best["repeats_step_ms_median"] = [r["step_ms_median"] for r in runs[alg]]
        best["repeats_step_ms_mean"] = [r["step_ms_mean"] for r in runs[alg]]
        best["repeats_peak_rss_mb"] = [r["peak_rss_mb"] for r in runs[alg]]
        results.append(best)
    ratios = _ratios(results)
    report = {
        "workload": "cost",
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "config": {"model": model, "cut": manifest.cut, "batch": batch,
                   "input_shape": list(input_shape), "num_classes": num_classes,
                   "steps": steps, "warmup": results[0]["warmup"], "repeats": repeats,
                   "threads": results[0]["threads"], "algorithms": list(algorithms)},
        "versions": _merged_versions(results),
        "results": results,
        "ratios_vs_cse_fsl": ratios,
        "targets": _targets(model, results, ratios),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    (out / "cost.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "cost.md").write_text(markdown(report))
    plot = plot_cost(report, out / "cost.png")
    report["plot"] = str(plot) if plot else None
    return report


def _merged_versions(results: list[dict[str, Any]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for res in results:
        merged.update(res["versions"])
    return merged


def _by_algorithm(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["algorithm"]: r for r in results}


def _ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    ref = _by_algorithm(results).get(REFERENCE)
    if ref is None:
        return None

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 4) if b else None

    return {r["algorithm"]: {
        "peak_rss": ratio(r["peak_rss_mb"], ref["peak_rss_mb"]),
        "step_ms_median": ratio(r["step_ms_median"], ref["step_ms_median"]),
        "step_ms_mean": ratio(r["step_ms_mean"], ref["step_ms_mean"]),
        "step_ms_min": ratio(r["step_ms_min"], ref["step_ms_min"]),
        "flops_per_step": ratio(r["flops_per_step"], ref["flops_per_step"]),
        "bytes_per_round": ratio(r["bytes_per_round"], ref["bytes_per_round"]),
    } for r in results}


def _targets(model: str, results: list[dict[str, Any]],
             ratios: dict[str, dict[str, float]] | None) -> list[dict[str, Any]]:
    rows = _by_algorithm(results)
    if "heron" not in rows and BLOCK not in rows:
        return []

    def vs_cse_fsl(alg: str, key: str) -> float | None:
        return ratios[alg][key] if ratios and alg in ratios else None

    measured = {"memory": vs_cse_fsl("heron", "peak_rss"),
                "speed vs forwards": rows["heron"]["step_over_forwards"]
                if "heron" in rows else None,
                "speed vs cse-fsl": vs_cse_fsl("heron", "step_ms_mean"),
                "block speed vs cse-fsl": vs_cse_fsl(BLOCK, "step_ms_mean")}
    out = []
    for name, what, limit in TARGETS.get(model, TARGETS["resnet18"]):
        value = measured[name]
        out.append({"target": name, "what": what, "limit": limit, "measured": value,
                    "met": None if value is None else value <= limit,
                    "missed_by": None if value is None or value <= limit
                    else round(value / limit - 1.0, 4)})
    return out


def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The cost table and the ratios against cse-fsl, as BENCHMARKS.md shows them."""
    cfg, ratios = report["config"], report["ratios_vs_cse_fsl"] or {}
    lines = [
        f"Cost: {cfg['model']} cut {cfg['cut']}, batch {cfg['batch']}, input "
        f"{'x'.join(str(s) for s in cfg['input_shape'])}, {_threads(cfg['threads'])}, "
        f"{cfg['steps']} timed steps after {cfg['warmup']} warm-up, one fresh process per "
        "algorithm" + (f" and run; best of {cfg['repeats']} runs by mean step time"
                       if cfg.get("repeats", 1) > 1 else ""),
        "",
        "| algorithm | runtime | step ms median (min-max) | step ms mean | its forwards ms "
        "| step / forwards | peak RSS MB | RSS x cse-fsl | step (mean) x cse-fsl | GFLOPs/step "
        "| FLOPs x cse-fsl | MB/step | MB/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        q = ratios.get(r["algorithm"], {})

        def x(key: str, q: dict[str, Any] = q) -> str:
            return "" if q.get(key) is None else f"{q[key]:.2f}"

        lines.append(
            f"| {r['algorithm']} | {r['runtime']} | {r['step_ms_median']:.1f} "
            f"({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | {r['step_ms_mean']:.1f} "
            f"| {r['forward_ms_median']:.1f} "
            f"({r['forwards_per_step']}x) | {r['step_over_forwards']:.3f} "
            f"| {r['peak_rss_mb']:.1f} | {x('peak_rss')} | {x('step_ms_mean')} "
            f"| {r['flops_per_step'] / 1e9:.2f} | {x('flops_per_step')} "
            f"| {_mb(r['bytes_per_step'])} | {_mb(r['bytes_per_round'])} |")
    lines += ["", "Peak RSS: whole process (VmHWM), MB = 2^20 bytes; of it, after importing "
              "the runtime alone: " + ", ".join(
                  f"{r['algorithm']} {r['rss_after_import_mb']:.0f}" for r in report["results"]
                  if r.get("rss_after_import_mb") is not None) + ". Bytes: MB = 10^6 bytes, "
              f"per round = {report['results'][0]['local_steps']} local steps, smashed data "
              f"every {report['results'][0]['upload_every']}."]
    loads = [(r["algorithm"], r.get("load_avg_1min") or [None, None]) for r in report["results"]]
    if all(None not in load for _, load in loads):
        lines += ["", "1-minute load average before/after each kept measurement (on "
                  f"{report['machine']['cpus']} CPUs; the measurement itself adds up to its "
                  f"{_threads(report['config']['threads'])}, more means other processes competed "
                  "and timings are inflated, torch's more than ONNX Runtime's): " + ", ".join(
                      f"{alg} {a:.1f}/{b:.1f}" for alg, (a, b) in loads) + "."]
    if report["targets"]:
        lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            measured = "n/a" if t["measured"] is None else f"{t['measured']:.3f}"
            met = ("n/a" if t["met"] is None else "yes" if t["met"]
                   else f"no, by {100 * t['missed_by']:.0f}%")
            lines.append(f"| {t['what']} | {measured} | <= {t['limit']} | {met} |")
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    m = report["machine"]
    lines += ["", f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gb']} GB; {versions}."]
    return "\n".join(lines) + "\n"


def plot_cost(report: dict[str, Any], path: Path) -> Path | None:
    """Bar charts of peak RSS and step time per algorithm; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    res = report["results"]
    names = [r["algorithm"] for r in res]
    colors = ["tab:red" if n.startswith("heron") else "tab:gray" for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.bar(names, [r["peak_rss_mb"] for r in res], color=colors)
    ax1.set_ylabel("peak RSS (MB, whole process)")
    ax1.set_title("device peak memory")
    ax2.bar(names, [r["step_ms_median"] for r in res], color=colors,
            yerr=[[r["step_ms_median"] - r["step_ms_min"] for r in res],
                  [r["step_ms_max"] - r["step_ms_median"] for r in res]], capsize=3)
    ax2.set_ylabel("step time (ms, median, min-max)")
    ax2.set_title("device step time")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    cfg = report["config"]
    fig.suptitle(f"{cfg['model']}/{cfg['cut']}, batch {cfg['batch']}, {_threads(cfg['threads'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
