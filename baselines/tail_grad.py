"""Issue 15 feasibility: what the exact-gradient tail step costs a device, against heron's
ZO step and frozen's forward (`exporter/tail_grad.py`).

    python -m baselines.tail_grad --out benchmarks/tail_grad [--repeats 3 --steps 6]

Each repeat runs three fresh child processes in turn, each doing only its job on the same
random batch shape (MiniLM, cut layer5 by default, batch 16, length 32, one ORT thread):
heron's ZO step and frozen's step through `heron profile`'s child (`baselines.profile`),
and the tail step here (the tail-gradient graph plus a numpy Adam update of its four
tensors; ONNX Runtime and numpy only). Per repeat, step time and peak RSS are divided by
heron's from the same repeat, so machine load that drifts between repeats cancels in pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ADAM = (3e-4, 0.9, 0.999, 1e-8)  # lr, beta1, beta2, eps: the screen's ffnout-last1 run
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262}  # two-sided 95% Student t by degrees of freedom


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def adam_update(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray,
                scratch: np.ndarray, t: int) -> None:
    """One Adam step (torch.optim.Adam's, ADAM's settings) on w in place, at step t >= 1.

    In place with one scratch array per tensor: a device should not allocate temporaries
    the size of the weights on every step (they would count in its peak RSS)."""
    lr, b1, b2, eps = ADAM
    m *= b1
    m += np.multiply(g, 1 - b1, out=scratch)
    v *= b2
    np.multiply(g, g, out=scratch)
    v += np.multiply(scratch, 1 - b2, out=scratch)
    np.sqrt(np.divide(v, 1 - b2 ** t, out=scratch), out=scratch)
    scratch += eps
    np.divide(m, scratch, out=scratch)
    w -= np.multiply(scratch, lr / (1 - b1 ** t), out=scratch)


def child(graph: str, batch: int, length: int, steps: int, warmup: int, threads: int,
          prepack: bool = True) -> dict:
    """In a fresh process: tail-gradient graph + numpy Adam, as a device would run it, with
    the device's session options (`prepack=False`: without ORT's packed weight copies)."""
    import onnxruntime as ort

    from edge_runtime.runtime import session_options

    opts = session_options(threads)
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()][2:]
    shapes = {i.name: i.shape for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    x = np.ones((batch, 2, length), dtype=np.int64)
    x[:, 0] = rng.integers(1000, 2000, (batch, length))  # as baselines.steps.random_batch
    y = rng.integers(0, 2, batch).astype(np.int64)
    # Start values do not change the cost; pretrained-sized ones keep the loss finite.
    w = {n: (rng.standard_normal(shapes[n]) * 0.02).astype(np.float32) for n in names}
    m = {n: np.zeros_like(v) for n, v in w.items()}
    v2 = {n: np.zeros_like(v) for n, v in w.items()}
    scratch = {n: np.empty_like(v) for n, v in w.items()}  # Adam in place: no temporaries
    times: list[float] = []
    loss = math.nan
    for t in range(1, warmup + steps + 1):
        start = time.perf_counter()
        out = session.run(None, {"x": x, "y": y, **w})
        loss = float(out[0])
        for n, g in zip(names, out[2:], strict=True):
            adam_update(w[n], g, m[n], v2[n], scratch[n], t)
        del out, g  # the next run's outputs must not coexist with these
        if t > warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return {"step_ms": times, "step_ms_median": statistics.median(times),
            "peak_rss_mb": _peak_rss_mb(), "loss_last": loss,
            "torch_imported": "torch" in sys.modules}


def _run_tail_child(graph: Path, args: argparse.Namespace, prepack: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "baselines.tail_grad", "--child", str(graph), "--batch",
           str(args.batch), "--max-length", str(args.max_length), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           *([] if prepack else ["--no-prepack"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200,
                          check=True, cwd=str(ROOT), stdin=subprocess.DEVNULL)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _mean_ci(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": len(values)}
    half = _T95[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(values)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from baselines.profile import _run_child, export_bundle, machine
    from baselines.steps import StepSpec
    from exporter.tail_grad import export_tail_grad
    from exporter.zoo import build_split

    shape = (2, args.max_length)
    with tempfile.TemporaryDirectory(prefix="heron-tailgrad-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        export_bundle("minilm", shape, 2, args.cut, bundle_dir)
        split = build_split("minilm", shape, 2, cut=args.cut, seed=0)
        t0 = time.perf_counter()
        graph = export_tail_grad(split, Path(tmp) / "tail" / "tail.onnx", batch=args.batch)
        export_s = time.perf_counter() - t0
        graph_bytes = sum(f.stat().st_size for f in graph.parent.iterdir())
        specs = {a: StepSpec(algorithm=a, model="minilm", cut=args.cut, batch=args.batch,
                             threads=args.threads, input_shape=shape, num_classes=2,
                             bundle_dir=str(bundle_dir), input_dtype="int64")
                 for a in ("heron", "frozen")}
        repeats = []
        for r in range(args.repeats):
            row = {a: _run_child(specs[a], args.steps, args.warmup, 1200) for a in specs}
            row["tail"] = _run_tail_child(graph, args, prepack=True)
            row["tail_noprepack"] = _run_tail_child(graph, args, prepack=False)
            for rec in row.values():
                rec.setdefault("step_ms_median", statistics.median(rec["step_ms"]))
            repeats.append(row)
            print(f"repeat {r}: " + ", ".join(
                f"{a} {rec['step_ms_median']:.0f} ms {rec['peak_rss_mb']:.0f} MB"
                for a, rec in row.items()), flush=True)
    ratios = {f"{a}_over_heron_{k}": _mean_ci([row[a][f] / row["heron"][f] for row in repeats])
              for a in ("tail", "tail_noprepack", "frozen") for k, f in (("step", "step_ms_median"),
                                                        ("rss", "peak_rss_mb"))}
    return {"model": "minilm", "cut": args.cut, "batch": args.batch,
            "max_length": args.max_length, "threads": args.threads, "steps": args.steps,
            "warmup": args.warmup, "adam": ADAM, "tail_export_s": export_s,
            "tail_graph_bytes": graph_bytes, "ratios": ratios,
            "repeats": [{a: {k: rec[k] for k in ("step_ms_median", "peak_rss_mb", "step_ms",
                                                 "torch_imported") if k in rec}
                         for a, rec in row.items()} for row in repeats],
            "machine": machine()}


def _markdown(res: dict[str, Any]) -> str:
    arms = list(res["repeats"][0])
    lines = ["| repeat | " + " | ".join(f"{a} ms" for a in arms) + " | "
             + " | ".join(f"{a} MB" for a in arms) + " |", "|---" * (1 + 2 * len(arms)) + "|"]
    for i, row in enumerate(res["repeats"]):
        lines.append(f"| {i} | " + " | ".join(f"{row[a]['step_ms_median']:.0f}" for a in arms)
                     + " | " + " | ".join(f"{row[a]['peak_rss_mb']:.1f}" for a in arms) + " |")
    lines += ["", "| ratio to heron (same repeat) | mean | 95% t interval |", "|---|---|---|"]
    for key, ci in res["ratios"].items():
        lines.append(f"| {key} | {ci['mean']:.3f} | [{ci['lo']:.3f}, {ci['hi']:.3f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m baselines.tail_grad", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", metavar="GRAPH", help=argparse.SUPPRESS)
    p.add_argument("--no-prepack", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="write result.json and result.md here")
    p.add_argument("--cut", default="layer5")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed steps per child")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per child first")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the three children")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.max_length, args.steps,
                               args.warmup, args.threads, not args.no_prepack)), flush=True)
        return 0
    res = run(args)
    md = _markdown(res)
    print(md, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / "result.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
