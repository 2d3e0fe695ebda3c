"""Device-side cost of each smashed codec (BENCHMARKS.md, "Smashed-data codecs").

``python -m baselines.smashed_codec`` (or ``encode``): numpy encode time per smashed batch.

``python -m baselines.smashed_codec zstd --out DIR``: zstd (levels 1 and 3) on top of each
codec, on real smashed batches (the bundle's conv1 / layer5 output for batches of the real
data set, at the exported initial weights): bytes saved and compress time per message.
Needs the ``zstandard`` package, which heron does not depend on (BENCHMARKS.md says why).

``python -m baselines.smashed_codec profile --out DIR``: `heron profile` of heron's device
step under each codec on real bundles, with the codec's encode (and the message's wire
encoding) on the device's uplink thread (what `heron device` does) and, as baselines,
inside the timed step ("inline": the device before that thread; fp32 inline is the device
before the codecs). Settings alternate within each repeat, in reversed order every other
repeat, so machine load hits them alike; each setting's step time, CPU time per step and
peak RSS are compared with fp32 inline's of the same repeat (a paired ratio per repeat,
then the mean and a 95% t interval over repeats).

``python -m baselines.smashed_codec server --out DIR``: the codecs' accuracy cost on the
server alone (fedcnn/conv1 on digits-28, same batches for every codec; `server_only`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.protocol.smashed_codec import CODECS, decode, encode

SHAPES = {"digits cnn/conv1": (32, 16, 8, 8), "digits-28 fedcnn/conv1": (32, 32, 14, 14)}


@dataclass(frozen=True)
class Workload:
    """One profiled device: model, cut and the shapes of `heron profile`'s random batch."""

    name: str
    model: str
    cut: str
    input_shape: tuple[int, ...]
    num_classes: int
    batch: int


WORKLOADS = {
    "digits": Workload("digits cnn/conv1", "cnn", "conv1", (1, 8, 8), 10, 32),
    "fedcnn": Workload("digits-28 fedcnn/conv1", "fedcnn", "conv1", (1, 28, 28), 10, 32),
    # text: (token ids, mask) of 32 tokens, batch 16 (heron profile's MiniLM defaults)
    "minilm": Workload("sst-2 minilm/layer5", "minilm", "layer5", (2, 32), 2, 16),
}


def encode_ms(x: np.ndarray, codec: str, repeats: int = 7, number: int = 20) -> float:
    """Best of `repeats` means over `number` encodes: the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            encode(x, codec)
        best = min(best, (time.perf_counter() - t) / number)
    return best * 1e3


def encode_main() -> None:
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)  # post-ReLU-like
        cells = ", ".join(f"{c} {encode_ms(x, c):.3f} ms" for c in CODECS)
        print(f"{name} {shape}: encode per batch: {cells}")


# -- heron profile under each codec ----------------------------------------------------------
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval (NaN bounds for fewer than 2 values or more than 11)."""
    a = np.asarray(values, dtype=np.float64)
    mean = float(a.mean())
    if not 2 <= a.size <= len(T975) + 1:
        return mean, math.nan, math.nan
    half = T975[a.size - 2] * float(a.std(ddof=1)) / math.sqrt(a.size)
    return mean, mean - half, mean + half


METRICS = ("step_ms_pair", "step_ms_mean", "step_ms_median", "step_cpu_ms_mean",
           "peak_rss_mb")
# (codec, uplink): the first is the baseline every ratio is taken against
SETTINGS = (("fp32", "inline"), ("fp32", "thread"), ("fp16", "thread"), ("int8", "thread"),
            ("int8", "inline"))


def pair_ms(samples: list[float], k: int) -> float:
    """Median over the profile's blocks of k consecutive steps (one upload each: heron's
    steps are timed a block at a time, uploading on the first), per step: the cost of a
    step with its share of the encode, robust to the outliers load puts in a mean."""
    blocks = [sum(samples[i:i + k]) / k for i in range(0, len(samples) - k + 1, k)]
    return statistics.median(blocks)


def profile_workload(w: Workload, *, repeats: int, steps: int, warmup: int,
                     settings: tuple[tuple[str, str], ...] = SETTINGS,
                     progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (codec, uplink) setting's profile `repeats` times on one exported bundle;
    ratios vs the first setting's (fp32 inline: the device before the codecs)."""
    from baselines.profile import export_bundle, profile

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {s: [] for s in settings}
    base = settings[0]
    with tempfile.TemporaryDirectory(prefix="heron-codec-") as tmp:
        bundle = Path(tmp) / "bundle"
        export_bundle(w.model, w.input_shape, w.num_classes, w.cut, bundle)
        for rep in range(repeats):
            order = settings if rep % 2 == 0 else tuple(reversed(settings))
            for codec, uplink in order:
                r = profile("heron", model=w.model, cut=w.cut, batch=w.batch, threads=1,
                            steps=steps, warmup=warmup, input_shape=w.input_shape,
                            num_classes=w.num_classes, bundle_dir=bundle, smashed_codec=codec,
                            uplink=uplink)
                r["step_ms_pair"] = pair_ms(r["step_ms_samples"], r["upload_every"])
                runs[codec, uplink].append(r)
                progress(f"{w.name} repeat {rep} {codec} {uplink}: step (block median) "
                         f"{r['step_ms_pair']:.2f} ms, mean {r['step_ms_mean']:.2f} ms, "
                         f"CPU {r['step_cpu_ms_mean']:.2f} ms, peak RSS "
                         f"{r['peak_rss_mb']:.1f} MB")
    rows = []
    for codec, uplink in settings:
        got = runs[codec, uplink]
        row: dict[str, Any] = {"codec": codec, "uplink": uplink,
                               "smashed_bytes": got[0]["smashed_bytes"],
                               "bytes_up_per_round": got[0]["bytes_up_per_round"]}
        for m in METRICS:
            row[m] = statistics.median(r[m] for r in got)
            ratios = [r[m] / b[m] for r, b in zip(got, runs[base], strict=True)]
            mean, lo, hi = t_interval(ratios)
            row[f"{m}_ratio"] = {"mean": mean, "lo": lo, "hi": hi, "per_repeat": ratios}
        row["load_avg_1min"] = [r["load_avg_1min"] for r in got]
        rows.append(row)
    first = runs[base][0]
    return {"workload": w.name, "model": w.model, "cut": w.cut, "batch": w.batch,
            "input_shape": list(w.input_shape), "threads": 1, "steps": steps,
            "warmup": warmup, "repeats": repeats, "upload_every": first["upload_every"],
            "baseline": {"codec": base[0], "uplink": base[1]},
            "versions": first["versions"], "machine": first["machine"], "rows": rows}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| workload | codec | uplink | smashed B/upload | step ms, block median "
             "| × base [95% CI] | step ms, mean | × base [95% CI] | CPU ms/step "
             "| × base [95% CI] | peak RSS MB | × base [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        base = res["baseline"]
        for row in res["rows"]:
            is_base = (row["codec"], row["uplink"]) == (base["codec"], base["uplink"])
            cells = []
            for m in ("step_ms_pair", "step_ms_mean", "step_cpu_ms_mean", "peak_rss_mb"):
                r = row[f"{m}_ratio"]
                cells += [f"{row[m]:.2f}" if m != "peak_rss_mb" else f"{row[m]:.1f}",
                          "base" if is_base else
                          f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"]
            lines.append(f"| {res['workload']} | {row['codec']} | {row['uplink']} | "
                         f"{row['smashed_bytes']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def profile_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m baselines.smashed_codec profile")
    ap.add_argument("--out", required=True, help="directory for codec_profile.{json,md}")
    ap.add_argument("--workloads", default="digits,fedcnn", help=f"of {','.join(WORKLOADS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="timed steps (one round, h = 40)")
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args(argv)
    each_workload(args.workloads, Path(args.out), "codec_profile", markdown,
                  lambda w: profile_workload(w, repeats=args.repeats, steps=args.steps,
                                             warmup=args.warmup))


def each_workload(names: str, out: Path, stem: str,
                  table: Callable[[list[dict[str, Any]]], str],
                  measure: Callable[[Workload], dict[str, Any]]) -> None:
    """`measure` each of the comma-separated workloads, timed; `stem`.json and .md in `out`
    are rewritten after each, so a cut-short run keeps what finished; the table printed."""
    chosen = names.split(",")
    for name in chosen:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; help: one of {', '.join(WORKLOADS)}")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in chosen:
        t0 = time.monotonic()
        res = measure(WORKLOADS[name])
        res["wall_s"] = round(time.monotonic() - t0, 1)
        results.append(res)
        print(f"{name}: {res['wall_s']} s", flush=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / f"{stem}.md").write_text(table(results))
    print(table(results), end="")


# -- interleaved: every setting in one process, block by block ---------------------------------
def interleave_blocks(spec_json: dict[str, Any], settings: tuple[tuple[str, str], ...],
                      rounds: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    """Run in a torch-free child: one heron runner per (codec, uplink) setting on the same
    bundle, then `rounds` rounds in each of which every setting runs one block of
    2 * upload_every steps (two uploads, the uplink drained at its end), in a fresh random
    order. Wall and CPU milliseconds per step of each block, by setting."""
    from baselines.steps import StepSpec, make_runner
    from edge_runtime.runtime import use_process_pool

    base = StepSpec.from_json(spec_json)
    use_process_pool(base.threads)  # as `heron device` does
    runners = [make_runner(replace(base, smashed_codec=c, uplink=u)) for c, u in settings]
    n = 2 * base.upload_every
    for r in runners:
        for _ in range(warmup):
            r.steps(n)
    wall = np.zeros((rounds, len(settings)))
    cpu = np.zeros((rounds, len(settings)))
    rng = np.random.default_rng(seed)
    for i in range(rounds):
        for j in rng.permutation(len(settings)):
            c0 = time.process_time()
            times = runners[j].steps(n)
            cpu[i, j] = (time.process_time() - c0) * 1000.0 / n
            wall[i, j] = sum(times) / n
    return {"wall_ms": wall.tolist(), "cpu_ms": cpu.tolist(), "steps_per_block": n}


def median_ratio(a: np.ndarray, b: np.ndarray, resamples: int = 2000,
                 seed: int = 0) -> dict[str, float]:
    """median(a) / median(b) for blocks paired by round, with a 95% bootstrap interval that
    resamples rounds (a round's blocks ran within milliseconds of each other, so a slow
    stretch of the machine moves both)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"ratio": float(np.median(a) / np.median(b)), "lo": float(lo), "hi": float(hi)}


def interleave_workload(w: Workload, *, rounds: int, warmup: int,
                        settings: tuple[tuple[str, str], ...] = SETTINGS,
                        timeout: float = 3600.0) -> dict[str, Any]:
    """`interleave_blocks` on `w`'s exported bundle in a fresh torch-free process; each
    setting's median step (wall and CPU) and its ratio to the first setting's."""
    import os
    import subprocess
    import sys

    from baselines.profile import ROOT, export_bundle, machine
    from baselines.steps import StepSpec

    with tempfile.TemporaryDirectory(prefix="heron-codec-") as tmp:
        bundle = Path(tmp) / "bundle"
        export_bundle(w.model, w.input_shape, w.num_classes, w.cut, bundle)
        manifest = export_bundle(w.model, w.input_shape, w.num_classes, w.cut, bundle)
        spec = StepSpec(algorithm="heron", model=w.model, cut=w.cut, batch=w.batch, threads=1,
                        input_shape=w.input_shape, num_classes=w.num_classes,
                        bundle_dir=str(bundle), input_dtype=manifest.input_dtype)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        job = json.dumps({"spec": spec.to_json(), "settings": settings, "rounds": rounds,
                          "warmup": warmup})
        proc = subprocess.run([sys.executable, "-m", "baselines.smashed_codec",
                               "interleave-child", job], capture_output=True, text=True,
                              env=env, timeout=timeout, stdin=subprocess.DEVNULL, cwd=str(ROOT))
        if proc.returncode != 0:
            raise SystemExit(f"interleaved profile of {w.name} failed:\n{proc.stderr[-2000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    wall, cpu = np.asarray(got["wall_ms"]), np.asarray(got["cpu_ms"])
    rows = []
    for j, (codec, uplink) in enumerate(settings):
        rows.append({"codec": codec, "uplink": uplink,
                     "step_ms_median": float(np.median(wall[:, j])),
                     "cpu_ms_median": float(np.median(cpu[:, j])),
                     "step_ratio": median_ratio(wall[:, j], wall[:, 0]),
                     "cpu_ratio": median_ratio(cpu[:, j], cpu[:, 0])})
    return {"workload": w.name, "model": w.model, "cut": w.cut, "batch": w.batch,
            "threads": 1, "rounds": rounds, "warmup_blocks": warmup,
            "steps_per_block": got["steps_per_block"],
            "baseline": {"codec": settings[0][0], "uplink": settings[0][1]},
            "machine": machine(), "rows": rows, "wall_ms": got["wall_ms"],
            "cpu_ms": got["cpu_ms"]}


def interleave_markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| workload | codec | uplink | step ms (median block) | × base [95% CI] "
             "| CPU ms/step | × base [95% CI] |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for row in res["rows"]:
            cells = [f"{row['step_ms_median']:.3f}", _ratio_cell(row["step_ratio"]),
                     f"{row['cpu_ms_median']:.3f}", _ratio_cell(row["cpu_ratio"])]
            lines.append(f"| {res['workload']} | {row['codec']} | {row['uplink']} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio_cell(r: dict[str, float]) -> str:
    return f"{r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"


def interleave_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m baselines.smashed_codec interleave")
    ap.add_argument("--out", required=True, help="directory for codec_interleaved.{json,md}")
    ap.add_argument("--workloads", default="fedcnn,digits", help=f"of {','.join(WORKLOADS)}")
    ap.add_argument("--rounds", type=int, default=600,
                    help="blocks per setting, interleaved (600)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed blocks per setting (20)")
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.warmup < 0:
        raise SystemExit("--rounds must be >= 2 and --warmup >= 0")
    each_workload(args.workloads, Path(args.out), "codec_interleaved", interleave_markdown,
                  lambda w: interleave_workload(w, rounds=args.rounds, warmup=args.warmup))


def interleave_child(job_json: str) -> None:
    job = json.loads(job_json)
    got = interleave_blocks(job["spec"], tuple(tuple(s) for s in job["settings"]),
                            int(job["rounds"]), int(job["warmup"]))
    print(json.dumps(got))


# -- zstd on top of the codecs ----------------------------------------------------------------
ZSTD_LEVELS = (1, 3)


def real_batches(w: Workload, bundle: Path, n: int, data_dir: Path | None,
                 seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` smashed batches of `w.batch` real training samples (seeded draw), through the
    exported bundle at its initial weights, as a device's first round sends them."""
    from edge_runtime.bundle import load_bundle
    from edge_runtime.manifest import SMASHED_OUTPUT
    from edge_runtime.runtime import LocalModel
    from heron_data.datasets import load_dataset

    if w.model == "minilm":
        ds = load_dataset("sst2", limit=n * w.batch, seed=seed, max_length=w.input_shape[1])
    elif w.model == "fedcnn":
        ds = load_dataset("mnist", data_dir, limit=n * w.batch, seed=seed)
    else:
        ds = load_dataset("digits", seed=seed)
    b = load_bundle(bundle)
    model = LocalModel(b, 1)
    idx = np.random.default_rng(seed).permutation(len(ds.y_train))[:n * w.batch]
    out = []
    for i in range(n):
        sel = idx[i * w.batch:(i + 1) * w.batch]
        x, y = ds.x_train[sel], ds.y_train[sel]
        out.append((model.run(b.weights, x, y, (SMASHED_OUTPUT,))[0], y))
    return out


def best_ms(fn: Callable[[], object], repeats: int = 5, number: int = 5) -> float:
    """Best of `repeats` means over `number` calls, in ms (the least disturbed by load)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best * 1e3


def zstd_workload(w: Workload, batches: int, data_dir: Path | None) -> dict[str, Any]:
    """Per codec and level: the wire message's bytes with and without zstd, and the ms to
    compress one message (medians over the batches)."""
    import zstandard

    from baselines.profile import export_bundle
    from edge_runtime.protocol import Smashed
    from edge_runtime.protocol import encode as encode_msg

    with tempfile.TemporaryDirectory(prefix="heron-zstd-") as tmp:
        bundle = Path(tmp) / "bundle"
        export_bundle(w.model, w.input_shape, w.num_classes, w.cut, bundle)
        data = real_batches(w, bundle, batches, data_dir)
    def wire(act: np.ndarray, y: np.ndarray, codec: str) -> bytes:
        return encode_msg(Smashed.coded("0" * 32, 1, "dev-0", 0, act, y, codec))

    rows = []
    for c in CODECS:
        raws = [wire(act, y, c) for act, y in data]
        row: dict[str, Any] = {
            "codec": c, "message_bytes": int(np.median([len(r) for r in raws])),
            "encode_ms": statistics.median(best_ms(partial(wire, act, y, c))
                                           for act, y in data)}
        for level in ZSTD_LEVELS:
            z = zstandard.ZstdCompressor(level=level)
            sizes = [len(z.compress(r)) / len(r) for r in raws]
            ms = [best_ms(partial(z.compress, r)) for r in raws]
            row[f"zstd{level}"] = {"ratio": statistics.median(sizes), "ratio_min": min(sizes),
                                   "ratio_max": max(sizes), "compress_ms": statistics.median(ms)}
        rows.append(row)
        progress = ", ".join(f"zstd-{lv} x{row[f'zstd{lv}']['ratio']:.3f} in "
                             f"{row[f'zstd{lv}']['compress_ms']:.2f} ms" for lv in ZSTD_LEVELS)
        print(f"{w.name} {c}: {row['message_bytes']:,} B, {progress}", flush=True)
    return {"workload": w.name, "model": w.model, "cut": w.cut, "batch": w.batch,
            "batches": batches, "zstandard": zstandard.__version__, "rows": rows}


def zstd_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m baselines.smashed_codec zstd")
    ap.add_argument("--out", required=True, help="directory for codec_zstd.json")
    ap.add_argument("--workloads", default="digits,fedcnn", help=f"of {','.join(WORKLOADS)}")
    ap.add_argument("--batches", type=int, default=8, help="real batches per workload")
    ap.add_argument("--mnist-dir", type=Path, default=None,
                    help="fedcnn: MNIST-format idx files (default: make digits-28)")
    args = ap.parse_args(argv)
    try:
        import zstandard  # noqa: F401
    except ImportError:
        raise SystemExit("zstd bench: needs the zstandard package; help: pip install "
                         "zstandard (heron itself does not need it)") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="heron-d28-") as tmp:
        mnist = args.mnist_dir
        if mnist is None and "fedcnn" in args.workloads:
            from baselines.generated_data import make_digits28

            mnist = make_digits28(Path(tmp) / "digits28")
        for name in args.workloads.split(","):
            results.append(zstd_workload(WORKLOADS[name], args.batches, mnist))
            (out / "codec_zstd.json").write_text(json.dumps(results, indent=1) + "\n")


def server_only(data_dir: Path, steps: int, seeds: int, codecs: tuple[str, ...] = CODECS,
                batch: int = 32) -> dict[str, Any]:
    """The codec's accuracy cost with the federation's other noise removed: fedcnn/conv1's
    server part trained by torch (Adam 1e-3, the server's default) on the smashed data of a
    fixed device part, coded and decoded by each codec, on the same batches in the same order
    for every codec of a seed; tested on the uncoded test activations, as the server's
    evaluation sees them. Paired differences codec - fp32 per seed."""
    import torch

    from exporter.zoo import build_split
    from heron_data.datasets import load_dataset

    torch.set_num_threads(1)
    ds = load_dataset("mnist", str(data_dir), seed=0)
    client = build_split("fedcnn", (1, 28, 28), 10, cut="conv1", seed=0).client
    with torch.no_grad():
        a_train = client(torch.from_numpy(ds.x_train)).numpy()
        a_test = client(torch.from_numpy(ds.x_test))
    y_test = torch.from_numpy(ds.y_test)
    acc: dict[str, list[float]] = {c: [] for c in codecs}
    for seed in range(seeds):
        for codec in codecs:
            torch.manual_seed(seed)
            server = build_split("fedcnn", (1, 28, 28), 10, cut="conv1", seed=seed).server
            opt = torch.optim.Adam(server.parameters(), 1e-3)
            rng = np.random.default_rng(seed)
            for _ in range(steps):
                idx = rng.choice(len(ds.y_train), batch, replace=False)
                x = decode(*encode(a_train[idx], codec))
                loss = torch.nn.functional.cross_entropy(
                    server(torch.from_numpy(x)), torch.from_numpy(ds.y_train[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                acc[codec].append(float((server(a_test).argmax(1) == y_test).float().mean()))
            print(f"  seed {seed} {codec}: test accuracy {acc[codec][-1]:.4f}", flush=True)
    paired = {}
    for codec in codecs:
        if codec != "fp32" and "fp32" in acc:
            diffs = [a - b for a, b in zip(acc[codec], acc["fp32"], strict=True)]
            mean, lo, hi = t_interval(diffs)
            paired[f"{codec} - fp32"] = {"diffs": diffs, "mean": mean, "ci95": [lo, hi]}
    return {"steps": steps, "batch": batch, "accuracy": acc, "paired": paired}


def server_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m baselines.smashed_codec server")
    ap.add_argument("--out", required=True, help="directory for codec_server_only.json")
    ap.add_argument("--steps", type=int, default=480,
                    help="server steps (480: 8 rounds x 3 devices x 20 uploads)")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    from baselines.generated_data import make_digits28

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        got = server_only(make_digits28(Path(tmp) / "digits28"), args.steps, args.seeds)
    (out / "codec_server_only.json").write_text(json.dumps(got, indent=1) + "\n")
    for name, p in got["paired"].items():
        lo, hi = p["ci95"]
        print(f"{name}: {100 * p['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] points; per "
              f"seed {', '.join(f'{100 * d:+.2f}' for d in p['diffs'])}")


def main(argv: list[str]) -> None:
    if argv and argv[0] == "profile":
        profile_main(argv[1:])
    elif argv and argv[0] == "interleave":
        interleave_main(argv[1:])
    elif argv and argv[0] == "interleave-child":
        interleave_child(argv[1])
    elif argv and argv[0] == "zstd":
        zstd_main(argv[1:])
    elif argv and argv[0] == "server":
        server_main(argv[1:])
    elif not argv or argv == ["encode"]:
        encode_main()
    else:
        raise SystemExit("usage: python -m baselines.smashed_codec [encode | profile --out DIR | "
                         "interleave --out DIR | zstd --out DIR | server --out DIR]")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
