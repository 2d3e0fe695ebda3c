"""ABAB: the default `heron run` (seed 0) alternately without and with --deterministic.

Usage: python benchmarks/deterministic/abab.py [OUT_DIR]  (default: a temporary folder).
Prints one JSON row per run: final and per-round test accuracy, wall and round seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="abab-"))
    for i, det in enumerate([False, True] * 3):
        out = root / f"run{i}"
        cmd = [sys.executable, "-m", "heron", "run", "--out", str(out)]
        cmd += ["--deterministic"] if det else []
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        summary = json.loads((out / "summary.json").read_text())
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps({
            "deterministic": det, "final": summary["final_test_accuracy"],
            "wall_s": round(wall, 1),
            "rounds_s": round(sum(r["round_seconds"] for r in rounds), 2),
            "per_round": [round(r["test_accuracy"], 4) for r in rounds]}), flush=True)


if __name__ == "__main__":
    main()
