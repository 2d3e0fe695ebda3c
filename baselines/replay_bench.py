"""`python -m baselines.replay_bench`: what `--device-sync replay` saves on a heron device's
round-end uplink, and what it costs the server.

For each workload one real device round (default TrainConfig: 40 ZO steps, q=1, Adam, a
32-sample batch) runs in ONNX Runtime on real data; its update is encoded both ways, with
the telemetry a device sends, and the byte counts compared in the same run. The server's
replay of that log (`edge_runtime.replay.replay_round`) is timed, median of `--repeats`,
and checked bit for bit against the device's weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_runtime.bundle import load_bundle
from edge_runtime.device.records import round_telemetry
from edge_runtime.protocol import TrainConfig, Update, encode
from edge_runtime.replay import replay_round, weights_hash
from edge_runtime.runtime import LocalModel, train_round

WORKLOADS = {  # name -> (model, cut, data set)
    "digits cnn/conv1": ("cnn", "conv1", "digits"),
    "digits-28 fedcnn/conv2": ("fedcnn", "conv2", "digits-28"),
}


def _data(name: str, tmp: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    from heron_data.datasets import load_dataset

    if name == "digits-28":
        from baselines.accuracy import make_digits28

        ds = load_dataset("mnist", str(make_digits28(tmp / "d28")))
    else:
        ds = load_dataset(name)
    return ds.x_train[:500], ds.y_train[:500], tuple(ds.input_shape)


def measure(name: str, perturb: str, repeats: int, tmp: Path) -> dict[str, object]:
    from exporter.export import export_split

    model_name, cut, data = WORKLOADS[name]
    x, y, shape = _data(data, tmp)
    out = tmp / f"{model_name}-{cut}"
    if not out.exists():
        export_split(model_name, shape, 10, out, cut=cut)
    bundle = load_bundle(out)
    model = LocalModel(bundle, threads=1)
    base = TrainConfig(device_sync="replay")
    cfg = dataclasses.replace(base, zo=dataclasses.replace(base.zo, perturb=perturb))
    result = train_round(model, bundle.weights, x, y, cfg, round_idx=1, device_id="dev-0")
    tel = round_telemetry(result, cfg, 1.0, 1, 0, 0)
    weights = Update("0123456789ab", 1, "dev-0", weights=result.theta, num_samples=len(y),
                     telemetry=tel)
    log = dataclasses.replace(weights, weights=np.zeros(0, np.float32), seeds=result.seeds,
                              projected=result.projected,
                              weights_hash=weights_hash(result.theta))
    blocks = tuple((s.offset, s.size) for s in bundle.manifest.segments)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        theta = replay_round(bundle.weights, result.seeds, result.projected, cfg,
                             blocks if perturb == "block" else None)
        times.append((time.perf_counter() - t0) * 1000.0)
    w, r = len(encode(weights)), len(encode(log))
    return {"workload": name, "perturb": perturb, "params": bundle.manifest.num_params,
            "weights_bytes": w, "replay_bytes": r, "ratio": r / w,
            "replay_ms": statistics.median(times), "step_ms": statistics.median(result.step_ms),
            "bit_identical": bool(np.array_equal(theta, result.theta))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--perturb", default="full,block")
    args = ap.parse_args()
    print("| workload | perturb | device params | update, weights (B) | update, replay (B) | "
          "replay / weights | server replay ms (40 steps) | device step ms | bit-identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in WORKLOADS:
            for perturb in args.perturb.split(","):
                m = measure(name, perturb, args.repeats, Path(tmp))
                print(f"| {m['workload']} | {m['perturb']} | {m['params']:,} | "
                      f"{m['weights_bytes']:,} | {m['replay_bytes']:,} | {m['ratio']:.4f} "
                      f"(1/{1 / float(m['ratio']):.0f}) | {m['replay_ms']:.2f} | "  # type: ignore[arg-type]
                      f"{m['step_ms']:.2f} | {m['bit_identical']} |", flush=True)


if __name__ == "__main__":
    main()
