"""Bytes per round under each smashed codec at `heron run`'s defaults (issue 12's byte target).

``python -m baselines.codec_bytes --out DIR``: for every workload, one round of a real
`heron run` (embedded broker, server and device processes) per uplink setting, at the run's
defaults for that data set (3 devices, 40 local steps, k = 2, batch 32, the data set's
default model and cut) and one round; SST-2 is cut to 4,000 sentences per split with
`--limit`, which still gives every device more than a round's 40 x 32 samples, so no batch
is partial and the messages are those of the full data set. A round's bytes leave out the
one-time bundle:
`bytes_up_by_kind` + `bytes_down_by_kind` of the round's metrics.jsonl line without
`bundle`. Every setting's total is divided by fp32's with weights sync (today's default) of
the same workload. The counts are the transports' own, which
`tests/server/test_loop_inprocess.py` checks add up to what the devices sent.

Writes DIR/codec_bytes.json and DIR/codec_bytes.md (the table in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baselines.generated_data import make_digits28, make_digits32c

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    """A data set as a user names it to `heron run`, with the model its defaults pick."""

    name: str
    dataset: str
    limit: int | None  # samples per split (None: all); more than a round's on every device
    options: tuple[str, ...] = ()  # `heron run` options beyond the defaults


WORKLOADS = {
    "digits": Workload("digits", "digits", None),
    "digits-28": Workload("digits-28 (MNIST idx)", "mnist", None),
    "sst2": Workload("SST-2", "sst2", 4000),
    # `heron run` gives 3x32x32 images the small cnn; the CIFAR model is resnet18
    "cifar": Workload("digits-32c (CIFAR-10 batches)", "cifar10", None,
                      ("--model", "resnet18")),
}
# (label, `heron run` options); the first, today's default, is what every ratio divides by
SETTINGS = (
    ("fp32", ("--smashed-codec", "fp32")),
    ("fp16", ("--smashed-codec", "fp16")),
    ("int8", ("--smashed-codec", "int8")),
    ("int8 + replay", ("--smashed-codec", "int8", "--device-sync", "replay")),
)


def round_bytes(run_dir: Path) -> dict[str, Any]:
    """Round 1's bytes by kind and direction, the bundle left out."""
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    up = {k: v for k, v in rec["bytes_up_by_kind"].items() if k != "bundle"}
    down = {k: v for k, v in rec["bytes_down_by_kind"].items() if k != "bundle"}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"up": up, "down": down, "total": sum(up.values()) + sum(down.values()),
            "device_params": summary["device_params"], "model": summary["model"],
            "cut": summary["cut"]}


def run_one(w: Workload, data_dir: Path | None, extra: tuple[str, ...], out: Path,
            seed: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "heron", "run", "--dataset", w.dataset, "--rounds", "1",
            "--seed", str(seed), "--out", str(out), "--overwrite", *w.options, *extra]
    if w.limit is not None:
        argv += ["--limit", str(w.limit)]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:])} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-1500:]}")
    return round_bytes(out)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | device params | setting | smashed up | weights up | weights down "
             "| control | total/round, no bundle | × fp32 |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["bytes"]
        lines.append(
            f"| {r['workload']} ({b['model']}/{b['cut']}) | {b['device_params']:,} "
            f"| {r['setting']} | {_mb(b['up']['smashed'])} MB | {_mb(b['up']['weights'])} MB "
            f"| {_mb(b['down']['weights'])} MB "
            f"| {_mb(b['up']['control'] + b['down']['control'])} MB | {_mb(b['total'])} MB "
            f"| {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m baselines.codec_bytes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="directory for codec_bytes.*")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {','.join(WORKLOADS)}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    bad = [n for n in names if n not in WORKLOADS]
    if bad or not names:
        ap.error(f"unknown workloads {bad}; choose from {', '.join(WORKLOADS)}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = {"digits-28": make_digits28(out / "data" / "digits28"),
            "cifar": make_digits32c(out / "data" / "digits32c")}
    # rows of workloads not run this time are kept from an earlier report in the same DIR
    done = out / "codec_bytes.json"
    rows: list[dict[str, Any]] = [
        r for r in (json.loads(done.read_text())["rows"] if done.exists() else [])
        if r["workload"] not in {WORKLOADS[n].name for n in names}]
    t0 = time.monotonic()
    for name in names:
        w = WORKLOADS[name]
        base = None
        for label, extra in SETTINGS:
            started = time.monotonic()
            run_dir = out / "runs" / f"{name}-{label.replace(' + ', '-')}"
            got = run_one(w, data.get(name), extra, run_dir, args.seed)
            base = base or got["total"]
            rows.append({"workload": w.name, "setting": label, "options": list(extra),
                         "bytes": got, "ratio": got["total"] / base})
            print(f"  {w.name:32s} {label:14s} {_mb(got['total'])} MB/round "
                  f"({got['total'] / base:.3f}x fp32), {time.monotonic() - started:.0f} s",
                  flush=True)
    from baselines.profile import machine

    report = {"command": " ".join(["python -m baselines.codec_bytes", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(),
              "rows": rows, "wall_s": round(time.monotonic() - t0, 1)}
    (out / "codec_bytes.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "codec_bytes.md").write_text(markdown(rows))
    print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
