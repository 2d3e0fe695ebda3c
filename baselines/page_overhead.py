"""What `--http` (the live fleet page with a browser's event stream open) adds to round time.

`python -m baselines.page_overhead --devices 30 --rounds 5 --pairs 3 --out DIR`: each pair is
two in-process federations (server loop + N ONNX Runtime devices in threads over the
loopback broker, the cnn on digits), one without the page and one with it and a client
reading `/api/events` all along; the order flips each pair so that load from elsewhere on
the machine hits both alike. Round 1 is left out (warm-up). The result is the paired ratio
of median round times (page / no page) with a t-interval over pairs, and the loop-side cost
of the view's hooks timed alone (per message, per snapshot), which bounds the overhead
independently of the machine's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from edge_runtime.device import Device, DeviceOptions, device_endpoint, message_limit
from edge_runtime.protocol import Presence, TrainConfig, topics
from edge_runtime.transport import Incoming
from edge_runtime.transport.loopback import LoopbackBroker, LoopbackTransport
from server.fleet_page import FleetPage
from server.fleet_view import FleetView
from server.loop import Server
from server.options import ServerOptions
from server.setup import build_run, server_endpoint

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def federation(root: Path, devices: int, rounds: int, page: bool) -> list[float]:
    """One run; its round times (seconds) after round 1."""
    broker = LoopbackBroker()
    opts = ServerOptions(broker="loopback", out=root / "run", devices=devices, rounds=rounds,
                         join_timeout=300, round_timeout=300, threads=1,
                         http="127.0.0.1:0" if page else None,
                         train=TrainConfig(local_steps=8, upload_every=2, batch_size=16))
    run = build_run(opts)
    server = Server(run, LoopbackTransport.at(broker, server_endpoint(opts.prefix, run.run_id)))
    fleet_page = None
    if page:
        assert isinstance(server.view, FleetView)
        fleet_page = FleetPage(server.view, "127.0.0.1:0")
        url = fleet_page.start()
        threading.Thread(target=_read_events, args=(url + "api/events",), daemon=True).start()
    threads = []
    for i in range(devices):
        shard = root / f"dev-{i}.npz"
        if not shard.exists():
            np.savez(shard, x=run.data.x_train[i::devices].astype(np.float32),
                     y=run.data.y_train[i::devices].astype(np.int64))
        ep = device_endpoint(f"dev-{i}", opts.prefix)
        t = LoopbackTransport(broker, ep.client_id, ep.subscriptions, will=ep.will,
                              max_message_bytes=message_limit(None))
        dev = Device(DeviceOptions(broker="loopback", device_id=f"dev-{i}", data=shard,
                                   threads=1, bundle_cache=root / "cache", wait_server_s=30), t)
        th = threading.Thread(target=dev.run, daemon=True)
        th.start()
        threads.append(th)
    server.run()
    for th in threads:
        th.join(60)
    if fleet_page is not None:
        fleet_page.stop()
    return [r["round_seconds"] for r in server.records[1:]]


def _read_events(url: str) -> None:
    """A browser's open page: the event stream read as it comes."""
    try:
        with urllib.request.urlopen(url, timeout=600) as resp:
            while resp.readline():
                pass
    except OSError:
        pass  # the page stopped


def hook_costs(devices: int, history: int) -> dict[str, float]:
    """Microseconds per `FleetView.message` and per snapshot + JSON (what each SSE event
    costs), at this fleet size and a run of `history` rounds."""
    from edge_runtime.algorithms import algorithm
    from server.members import Members
    from server.policy import Limits

    members = Members(Limits(), topics.DEFAULT_PREFIX, "r", algorithm("heron"), "s",
                      send_bundle=lambda d: None, leave_round=lambda d: None)
    view = FleetView(topics.DEFAULT_PREFIX)
    incs = []
    for i in range(devices):
        dev = f"dev-{i}"
        members.online.add(dev)
        incs.append(Incoming(topics.device_status(dev), Presence("r", -1, dev, state="online"),
                             100))
    rec = {"round": 1, "test_accuracy": 0.9, "test_loss": 0.3, "updates": [], "participants": []}
    for _ in range(history):
        view.round_done(rec, members)
    n = 20_000
    t0 = time.perf_counter()
    for k in range(n):
        view.message(incs[k % devices], members, None)
    per_message = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(200):
        json.dumps(view.snapshot())
    per_event = (time.perf_counter() - t0) / 200 * 1e6
    return {"message_us": round(per_message, 2), "event_us": round(per_event, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.pairs):
            order = (False, True) if k % 2 == 0 else (True, False)
            med = {}
            for page in order:
                times = federation(Path(tmp) / f"p{k}-{int(page)}", args.devices, args.rounds,
                                   page)
                med[page] = statistics.median(times)
                print(f"pair {k}: {'with' if page else 'without'} --http: median round "
                      f"{med[page]:.3f} s ({', '.join(f'{t:.2f}' for t in times)})", flush=True)
            pairs.append(med[True] / med[False])
    mean = statistics.fmean(pairs)
    half = T95[len(pairs) - 1] * statistics.stdev(pairs) / len(pairs) ** 0.5 \
        if len(pairs) > 1 else float("nan")
    costs = hook_costs(args.devices, history=200)
    result = {"devices": args.devices, "rounds": args.rounds, "pairs": args.pairs,
              "ratios": [round(r, 4) for r in pairs], "ratio_mean": round(mean, 4),
              "ratio_ci95": [round(mean - half, 4), round(mean + half, 4)],
              "hooks": costs, "machine": platform.machine(),
              "cpus": len(os.sched_getaffinity(0))}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "page_overhead.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
