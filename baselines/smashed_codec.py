"""Device-side cost of each smashed codec: numpy encode time per smashed batch
(`python -m baselines.smashed_codec`; BENCHMARKS.md, "Smashed-data codecs")."""

from __future__ import annotations

import time

import numpy as np

from edge_runtime.protocol.smashed_codec import CODECS, encode

SHAPES = {"digits cnn/conv1": (32, 16, 8, 8), "digits-28 fedcnn/conv1": (32, 32, 14, 14)}


def encode_ms(x: np.ndarray, codec: str, repeats: int = 7, number: int = 20) -> float:
    """Best of `repeats` means over `number` encodes: the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            encode(x, codec)
        best = min(best, (time.perf_counter() - t) / number)
    return best * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)  # post-ReLU-like
        cells = ", ".join(f"{c} {encode_ms(x, c):.3f} ms" for c in CODECS)
        print(f"{name} {shape}: encode per batch: {cells}")


if __name__ == "__main__":
    main()
