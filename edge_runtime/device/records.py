"""The device's side of the protocol's records: the training config it reads from the
server's presence (`ServerInfo.train`, which sizes the join-time memory check), and what it
says about itself, built as the typed `JoinProfile` (at join) and `Telemetry` (each round's
update) so that a misnamed field fails where it is written."""

from __future__ import annotations

import logging
import platform
import statistics
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from edge_runtime.profiles import MemoryVerdict, Profile
from edge_runtime.protocol import JoinProfile, Telemetry, TrainConfig, announced_train
from edge_runtime.runtime import RoundResult, peak_rss_mb

log = logging.getLogger("heron.device")


def announced_config(info: object) -> TrainConfig | None:
    """The run's training config from the server's presence, for the join-time memory check:
    None when the presence carries none, or (with a warning) when it is malformed."""
    try:
        obj = announced_train(info)
        if obj is None:
            return None
        batch = obj.get("batch_size")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch_size {batch!r} is not a positive integer")
        return TrainConfig.from_json(obj)
    except (TypeError, ValueError) as exc:
        log.warning("ignoring the training config in the server's presence (%s); the join-time "
                    "memory check uses batch size %d", exc, TrainConfig().batch_size)
        return None


def join_profile(samples: int, threads: int | None, algorithms: Sequence[str],
                 profile: Profile | None, verdict: MemoryVerdict | None) -> JoinProfile:
    """What the server learns at join: the shard size, what the device runs, the board and
    its libraries, and the memory check made before joining (`verdict`), when it ran."""
    v = verdict
    return JoinProfile(
        samples=samples, python=platform.python_version(), machine=platform.machine(),
        onnxruntime=ort.__version__, numpy=np.__version__, threads=threads,
        rss_mb=round(peak_rss_mb(), 1), algorithms=tuple(algorithms),
        profile=v.profile if v else (profile.name if profile else "none"),
        budget_mb=round(v.budget_mb, 1) if v else None,
        memory_mb=round(v.needed_mb, 1) if v else None,
        memory_batch=v.batch if v else None,
        memory_extrapolated=v.extrapolated if v else None,
        max_batch_measured_fit=v.largest_fitting if v else None)


def round_telemetry(result: RoundResult, cfg: TrainConfig, round_s: float,
                    threads: int | None, bytes_in: int, bytes_out: int) -> Telemetry:
    """What a round measured, for its Update; raises ValueError (CodecError) on a value the
    protocol bounds refuse (a NaN loss, say)."""
    return Telemetry(
        peak_rss_mb=round(peak_rss_mb(), 2),
        step_ms_median=round(statistics.median(result.step_ms), 3),
        step_ms_mean=round(statistics.fmean(result.step_ms), 3),
        round_s=round(round_s, 3),
        loss_first=result.losses[0], loss_last=result.losses[-1],
        loss_mean=float(np.mean(result.losses)),
        steps=cfg.local_steps, smashed_sent=result.smashed_sent,
        threads=threads, algorithm=cfg.algorithm, bytes_in=bytes_in, bytes_out=bytes_out)
