"""ABAB: default digits heron run, seed 0, with and without --deterministic."""
import json, resource, subprocess, sys, time
rows = []
for i, det in enumerate([False, True, False, True, False, True]):
    out = f"/tmp/det/run{i}"
    cmd = ["/work/main/.venv/bin/heron", "run", "--out", out] + (["--deterministic"] if det else [])
    t0 = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    s = json.load(open(f"{out}/summary.json"))
    m = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
    rows.append({"deterministic": det, "final": s["final_test_accuracy"], "wall_s": round(wall, 1),
                 "rounds_s": round(sum(r["round_seconds"] for r in m), 2),
                 "per_round": [round(r["test_accuracy"], 4) for r in m]})
    print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open("/tmp/det/rows.json", "w"))
