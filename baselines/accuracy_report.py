"""The accuracy bench's report: the table over seeds, the issue's checks, markdown and plots.

Computed from the runs `baselines.accuracy` collected; only `plot_accuracy` writes files
(and needs matplotlib).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from baselines.centralized import CENTRALIZED
from baselines.generated_data import CIFAR_FORMAT, MNIST_FORMAT

SUBJECT = "heron"  # the algorithm the report is about (bold row, thick line, the checks)


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


CONTROLS = ("frozen", "cse-fsl", CENTRALIZED)  # what every other algorithm is paired against


def default_pairs(algorithms: Sequence[str]) -> list[tuple[str, str]]:
    """(a, b) to report as a - b per seed: does training the device pay (cse-fsl - frozen,
    cse-fsl - centralized), and each other algorithm present (heron, heron-tail, ...)
    against frozen, cse-fsl and centralized, in the order the algorithms came."""
    present = list(dict.fromkeys(algorithms))
    pairs = [("cse-fsl", "frozen")]
    for a in present:
        if a not in CONTROLS:
            pairs += [(a, "frozen"), (a, "cse-fsl"), (a, CENTRALIZED)]
    return [*pairs, ("cse-fsl", CENTRALIZED)]


TAIL = 5  # rounds averaged for the second paired table: the final round alone is noisy


def paired(runs: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]] | None = None,
           tail: int = 1) -> list[dict[str, Any]]:
    """Paired per-seed differences of the test accuracy (the final round's, or with `tail`
    the mean of the last `tail` rounds'), a - b, with their mean and 95% t interval, per
    (dataset, partition) and pair present on at least two common seeds: the seeds share
    data, shards and initialisation, so pairing removes their spread."""
    from baselines.race import t_interval  # imports torch: only when a report is made

    if pairs is None:
        pairs = default_pairs([r["algorithm"] for r in runs])

    acc = {(r["dataset"], r["partition"], r["algorithm"], r["seed"]):
           (r["final_test_accuracy"] if tail == 1
            else statistics.fmean(r["test_accuracy_per_round"][-tail:])) for r in runs}
    out = []
    for ds, part in sorted({(r["dataset"], r["partition"]) for r in runs}):
        for a, b in pairs:
            seeds = sorted(s for (d, p, alg, s) in acc if (d, p, alg) == (ds, part, a)
                           and (ds, part, b, s) in acc)
            if len(seeds) < 2:
                continue
            diffs = [acc[ds, part, a, s] - acc[ds, part, b, s] for s in seeds]
            mean, lo, hi = t_interval(diffs)
            out.append({"dataset": ds, "partition": part, "a": a, "b": b, "tail": tail,
                        "seeds": seeds,
                        "diffs": diffs, "mean": mean, "ci95": [lo, hi],
                        "excludes_0": bool(lo > 0 or hi < 0)})
    return out


def paired_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The paired differences as a markdown table (points), [] when there are none."""
    if not rows:
        return []
    tail = rows[0]["tail"]
    what = "final test accuracy" if tail == 1 else f"mean test accuracy of the last {tail} rounds"
    lines = ["", f"Paired per-seed differences of the {what}:", "",
             "| data set | partition | difference | per seed (points) | mean | 95% t "
             "interval | excludes 0 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{100 * d:+.2f}" for d in r["diffs"])
        lo, hi = r["ci95"]
        lines.append(f"| {r['dataset']} | {r['partition']} | {r['a']} - {r['b']} | {per} | "
                     f"{100 * r['mean']:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
                     f"{'yes' if r['excludes_0'] else 'no'} |")
    return lines


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    alpha = (f", Dirichlet alpha {cfg['alpha']}" if "dirichlet" in cfg["partitions"] else "")
    mnist = (f"; {MNIST_FORMAT} = {cfg['mnist_format_source']}" if MNIST_FORMAT in cfg["datasets"]
             else "")
    if CIFAR_FORMAT in cfg["datasets"]:
        mnist += f"; {CIFAR_FORMAT} = {cfg.get('cifar_format_source')}"
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
    lines += paired_markdown(report.get("paired", []))
    lines += paired_markdown(report.get("paired_tail", []))
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


def pair_benches(a: dict[str, Any], b: dict[str, Any], label_a: str, label_b: str
                 ) -> dict[str, Any]:
    """Two accuracy benches that differ in one `heron run` option (a codec, say), paired by
    seed: each algorithm of `a` against the same algorithm of `b`, final and last-TAIL."""
    runs = ([{**r, "algorithm": f"{r['algorithm']} {label_a}"} for r in a["runs"]]
            + [{**r, "algorithm": f"{r['algorithm']} {label_b}"} for r in b["runs"]])
    algs = dict.fromkeys(r["algorithm"] for r in a["runs"])
    pairs = [(f"{alg} {label_a}", f"{alg} {label_b}") for alg in algs]
    return {"a": {"label": label_a, "command": a.get("command")},
            "b": {"label": label_b, "command": b.get("command")},
            "paired": paired(runs, pairs), "paired_tail": paired(runs, pairs, tail=TAIL)}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m baselines.accuracy_report pair A B --labels LA,LB --out FILE``: pair two
    benches' accuracy.json (written as FILE.json and FILE.md)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m baselines.accuracy_report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pair", help="pair two accuracy benches by seed (a - b)")
    p.add_argument("a", type=Path, help="bench directory (or its accuracy.json) for a")
    p.add_argument("b", type=Path, help="bench directory (or its accuracy.json) for b")
    p.add_argument("--labels", required=True, help="LA,LB: what differs, e.g. int8,fp32")
    p.add_argument("--out", required=True, type=Path, help="FILE: writes FILE.json, FILE.md")
    args = ap.parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")]
    if len(labels) != 2 or not all(labels):
        ap.error("--labels takes two comma-separated labels")

    def load(path: Path) -> dict[str, Any]:
        return json.loads((path / "accuracy.json" if path.is_dir() else path).read_text())

    got = pair_benches(load(args.a), load(args.b), *labels)
    if not got["paired"]:
        raise SystemExit("no algorithm and data set has two or more seeds in both benches")
    args.out.with_suffix(".json").write_text(json.dumps(got, indent=2) + "\n")
    md = "\n".join([*paired_markdown(got["paired"]), *paired_markdown(got["paired_tail"])])
    args.out.with_suffix(".md").write_text(md.lstrip("\n") + "\n")
    print(md)


if __name__ == "__main__":
    main()
