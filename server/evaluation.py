"""When and on what the server evaluates: every `--eval-every` rounds on a seeded subset of
`--eval-limit` test examples while training, on the whole test set after the last round.

Evaluating the full test set every round made the server, not the devices, the slow part of a
round (issue 16: a 7,600-sentence minilm test set took longer than the devices' training).
Evaluation runs while the devices wait for the next round, so it takes all the machine's
cores (torch threads) and gives the server's own setting back afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from heron_data.progress import throttled
from server.trainer import Evaluation, evaluate


@dataclass(frozen=True)
class EvalPlan:
    """`every`: evaluate rounds r with r % every == 0 (and always the last); `limit`: test
    examples used on those rounds (None: all); `seed`: which ones."""

    every: int = 1
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"--eval-every must be an integer >= 1, got {self.every!r}")
        if self.limit is not None and (not isinstance(self.limit, int)
                                       or isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"--eval-limit must be an integer >= 1, got {self.limit!r}")

    def evaluates(self, r: int, last: int) -> bool:
        return r == last or r % self.every == 0

    def subset(self, n: int, r: int, last: int) -> np.ndarray | None:
        """Indices of round r's test examples, in ascending order; None: the whole set. The
        same subset every round (one seed), so round-to-round changes are the model's."""
        if r == last or self.limit is None or self.limit >= n:
            return None
        rng = np.random.default_rng([self.seed, 0x4556414C])  # "EVAL": apart from other streams
        return np.sort(rng.choice(n, size=self.limit, replace=False))


@contextmanager
def all_cores(threads: int | None = None) -> Iterator[int]:
    """torch uses every core inside (or `threads`: --server-threads, the user's cap), the
    previous thread count after."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    torch.set_num_threads(threads or max(before, cores))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def evaluate_round(plan: EvalPlan, r: int, last: int, client: nn.Module, server: nn.Module,
                   x: np.ndarray, y: np.ndarray, threads: int | None = None
                   ) -> Evaluation | None:
    """Round r's evaluation under `plan` (None: not this round), on all cores, with progress
    lines while it runs."""
    if not plan.evaluates(r, last):
        return None
    idx = plan.subset(len(y), r, last)
    if idx is not None:
        x, y = x[idx], y[idx]
    what = "the full test set" if idx is None else f"{len(idx)} test examples (--eval-limit)"
    with all_cores(threads):
        return evaluate(client, server, x, y,
                        progress=throttled(f"round {r}: evaluating on {what}", "examples"))
