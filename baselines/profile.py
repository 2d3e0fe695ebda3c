"""`heron profile`: one algorithm's device training step, measured in a fresh process.

The parent (which has torch and onnx) builds the bundle and counts FLOPs and payload bytes
(`baselines.counts`); a child process started for this one measurement builds the step,
runs warm-up and timed steps and reports its own peak RSS. So each algorithm's memory is
that of a process doing only its job: the ONNX Runtime algorithms' child imports
edge_runtime and numpy, never torch (the result says so in ``torch_imported``); the torch
algorithms' child imports torch and the model zoo, never ONNX Runtime.

Timed steps and plain forwards alternate in blocks of k steps (k = upload_every; block-wise
heron: whole rounds of h steps, see HeronRunner), so that load from other processes on the
machine hits both alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from baselines.counts import (
    BLOCK_FLOPS_METHOD,
    ONNX_FLOPS_METHOD,
    TORCH_FLOPS_METHOD,
    block_flops,
    onnx_graph_flops,
    payload_bytes,
)
from baselines.steps import ONNX_ALGORITHMS, StepSpec, make_runner
from edge_runtime import algorithms as registry
from edge_runtime.protocol.smashed_codec import DEFAULT_CODEC

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOCAL_STEPS = 40  # h, as edge_runtime.protocol.TrainConfig
DEFAULT_UPLOAD_EVERY = 2  # k, as edge_runtime.protocol.TrainConfig


class ProfileError(RuntimeError):
    """The measured child process failed or returned something unusable."""


# -- what the child process reports ----------------------------------------------------------
def _proc_status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status in MB (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Whole-process peak RSS as the kernel keeps it (VmHWM, reset at exec).

    Not getrusage's ru_maxrss, which Linux carries across fork+exec (the child would report
    the parent's peak). Read here rather than via edge_runtime.runtime.peak_rss_mb so a
    torch child does not load ONNX Runtime just to read one line.
    """
    peak = _proc_status_mb("VmHWM")
    if peak is None:
        import psutil

        info = psutil.Process().memory_info()
        peak = getattr(info, "peak_wset", info.rss) / 2**20
    return peak


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("onnxruntime", "torch"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(mod.__version__)
    return out


def measure(spec: StepSpec, steps: int, warmup: int) -> dict[str, Any]:
    """Run in the child: build the step, warm up, then alternate timed steps and forwards."""
    if spec.algorithm in ONNX_ALGORITHMS:
        import onnxruntime  # noqa: F401  (its import cost belongs to the baseline RSS)

        from edge_runtime.runtime import use_process_pool

        use_process_pool(spec.threads)  # as `heron device` does
    else:
        import torch  # noqa: F401
    rss_import = _proc_status_mb("VmRSS")
    runner = make_runner(spec)
    block = runner.steps_per_call
    if warmup:
        runner.steps(warmup)
        runner.forwards(min(warmup, block))
    step_ms: list[float] = []
    fwd_ms: list[float] = []
    cpu_s = 0.0  # the process's CPU time in the timed steps: every thread, the uplink's too
    while len(step_ms) < steps:
        n = min(block, steps - len(step_ms))
        c0 = time.process_time()
        step_ms += runner.steps(n)
        cpu_s += time.process_time() - c0
        fwd_ms += runner.forwards(n)
    threads = (runner.model.threads if spec.algorithm in ONNX_ALGORITHMS  # type: ignore[attr-defined]
               else sys.modules["torch"].get_num_threads())
    return {
        "step_ms": step_ms,
        "step_cpu_ms_mean": cpu_s * 1000.0 / len(step_ms),
        "forward_ms": fwd_ms,
        "forwards_per_step": runner.forwards_per_step,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_import_mb": rss_import,
        "threads_used": int(threads),
        "torch_imported": "torch" in sys.modules,
        "onnxruntime_imported": "onnxruntime" in sys.modules,
        "versions": _versions(),
        "chain": getattr(runner, "chain_info", None),
    }


def child_main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "--child":
        print("usage: python -m baselines.profile --child SPEC_JSON STEPS,WARMUP (internal; "
              "help: use `heron profile`)", file=sys.stderr)
        return 2
    spec = StepSpec.from_json(json.loads(argv[1]))
    steps, warmup = (int(v) for v in argv[2].split(","))
    print(json.dumps(measure(spec, steps, warmup)), flush=True)
    return 0


def export_bundle(model: str, input_shape: tuple[int, ...], num_classes: int,
                  cut: str | None, out_dir: str | Path, seed: int = 0,
                  tail_batch: int | None = None) -> Any:
    """The device bundle every ONNX Runtime measurement runs (exported with torch, here);
    with `tail_batch`, heron-tail's (the tail in the weights, its gradient graph for that
    batch), as its server exports it."""
    from exporter.export import export_split

    if tail_batch is None:
        return export_split(model, input_shape, num_classes, out_dir, cut=cut, seed=seed)
    from exporter.export import export_bundle as export
    from exporter.tail_grad import mark_tail_trainable
    from exporter.zoo import build_split

    split = build_split(model, input_shape, num_classes, cut=cut, seed=seed)
    mark_tail_trainable(split)
    return export(split, out_dir, tail_batch=tail_batch)


def _run_child(spec: StepSpec, steps: int, warmup: int, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(spec.threads)  # the same for every algorithm
    cmd = [sys.executable, "-m", "baselines.profile", "--child", json.dumps(spec.to_json()),
           f"{steps},{warmup}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=str(ROOT))
    except subprocess.TimeoutExpired as exc:
        raise ProfileError(f"profiling {spec.algorithm} took more than {timeout:.0f} s; help: "
                           "fewer --steps or a smaller --batch") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ProfileError(f"profiling {spec.algorithm} failed (exit {proc.returncode}):\n{tail}")
    try:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError) as exc:
        raise ProfileError(f"profiling {spec.algorithm} printed no result: "
                           f"{proc.stdout[-500:]!r}") from exc


def profile(
    algorithm: str,
    *,
    model: str = "resnet18",
    cut: str | None = None,
    batch: int = 64,
    threads: int | None = None,
    steps: int = 20,
    warmup: int | None = None,
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    local_steps: int = DEFAULT_LOCAL_STEPS,
    upload_every: int = DEFAULT_UPLOAD_EVERY,
    seed: int = 0,
    bundle_dir: str | Path | None = None,
    timeout: float = 3600.0,
    perturb: str = "full",
    q: int = 1,
    smashed_codec: str = DEFAULT_CODEC,
    uplink: str = "thread",
) -> dict[str, Any]:
    """Profile one device step of `algorithm`; the JSON object `heron profile` prints.

    `warmup` defaults to `steps`. `bundle_dir` reuses an exported bundle (it must match
    model, cut, input shape and classes); otherwise one is exported to a temporary directory.
    `perturb` is heron's ZO perturbation: "full" (the paper) or "block" (block-wise ZO);
    `q` its directions per step (`heron run --q`).
    `smashed_codec` codes the smashed uploads in the timed steps, as a device does, and
    sizes them in the byte counts (algorithms that upload none ignore it, as `heron run` does).
    `uplink` is where they are coded: "thread" (the device's uplink thread) or "inline"
    (inside the step, the device before that thread: a baseline).
    """
    alg = registry.algorithm(algorithm)  # ValueError naming the choices
    warmup = steps if warmup is None else warmup
    threads = threads or os.cpu_count() or 1
    for name, value, least in (("steps", steps, 1), ("warmup", warmup, 0),
                               ("local_steps", local_steps, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    from edge_runtime.bundle import GRAPH, load_bundle
    from exporter.zoo import build_split

    split = build_split(model, input_shape, num_classes, cut=cut, seed=seed)  # validates all
    with tempfile.TemporaryDirectory(prefix="heron-profile-") as tmp:
        if bundle_dir is None:
            bundle_dir = Path(tmp) / "bundle"
            export_bundle(model, input_shape, num_classes, split.cut, bundle_dir, seed,
                          tail_batch=batch if alg.needs_tail_graph else None)
        bundle = load_bundle(bundle_dir)
        m = bundle.manifest
        spec = StepSpec(algorithm=algorithm, model=model, cut=split.cut, batch=batch,
                        threads=threads, input_shape=split.input_shape,
                        num_classes=num_classes, upload_every=upload_every, seed=seed,
                        bundle_dir=str(bundle_dir), perturb=perturb, local_steps=local_steps,
                        input_dtype=split.input_dtype, q=q,
                        smashed_codec=smashed_codec, uplink=uplink)
        t0, load0 = time.monotonic(), _load_1min()
        got = _run_child(spec, steps, warmup, timeout)
        wall, load1 = time.monotonic() - t0, _load_1min()
        if algorithm in ONNX_ALGORITHMS:
            if got["torch_imported"]:
                raise ProfileError(f"the {algorithm} child imported torch; its memory would "
                                   "not be a device's")
            # a graph with external data is read from disk, where onnx finds its tensors
            data = bundle.external_data
            graph, name = ((bundle.tail, m.tail.file) if alg.needs_tail_graph and m.tail
                           else (bundle.graph, GRAPH))
            full_flops = onnx_graph_flops(graph if data is None else data.parent / name, batch)
            flops = full_flops * int(got["forwards_per_step"])
            flops_method = ONNX_FLOPS_METHOD
            if perturb == "block":
                flops = block_flops(bundle, batch, got["chain"]["draws"], q)
                flops_method = BLOCK_FLOPS_METHOD
        else:
            import torch

            from baselines.steps import TorchRunner

            torch_threads = torch.get_num_threads()
            try:
                flops = TorchRunner(spec).count_flops()
            finally:
                torch.set_num_threads(torch_threads)
            flops_method = TORCH_FLOPS_METHOD
    m = bundle.manifest
    client = sum(p.size for p in m.params if p.role == "client")
    server = sum(p.numel() for p in split.server.parameters())
    part_params = {"client": client, "aux": m.num_params - client, "server": server}
    device_params = sum(part_params[p] for p in alg.trained_parts)
    step_ms, fwd_ms = got["step_ms"], got["forward_ms"]
    step_med, fwd_med = statistics.median(step_ms), statistics.median(fwd_ms)
    return {
        "algorithm": algorithm, "model": model, "cut": split.cut, "batch": batch,
        **({"perturb": perturb, "q": q} if alg.device_update == "zo" else {}),
        "input_shape": list(split.input_shape), "num_classes": num_classes,
        "threads": threads, "threads_used": got["threads_used"],
        "runtime": "onnxruntime" if algorithm in ONNX_ALGORITHMS else "torch",
        "steps": steps, "warmup": warmup,
        "step_ms_median": round(step_med, 3), "step_ms_min": round(min(step_ms), 3),
        # block-wise steps differ by the block drawn: their mean is the cost per step
        "step_ms_mean": round(statistics.fmean(step_ms), 3),
        "step_ms_max": round(max(step_ms), 3),
        # CPU time of the whole process per timed step (ONNX Runtime's and the uplink's
        # threads too): what a step costs a board with no core to spare
        "step_cpu_ms_mean": round(got["step_cpu_ms_mean"], 3),
        "forward_ms_median": round(fwd_med, 3), "forwards_per_step": got["forwards_per_step"],
        "step_over_forwards": round(step_med / fwd_med, 4),
        "forward_method": ("the same ONNX Runtime session run on fixed weights with the same "
                           "outputs as the step's passes, in the same process"
                           if algorithm in ONNX_ALGORITHMS else
                           "torch forward of the trained modules under no_grad, same process"),
        "peak_rss_mb": round(got["peak_rss_mb"], 1),
        "rss_after_import_mb": (None if got["rss_after_import_mb"] is None
                                else round(got["rss_after_import_mb"], 1)),
        "rss_method": "VmHWM of the fresh child process (/proc/self/status), whole process",
        "torch_imported": got["torch_imported"],
        "onnxruntime_imported": got["onnxruntime_imported"],
        **({"segment_chain": got["chain"]} if got.get("chain") else {}),
        "trained_params": device_params,
        "flops_per_step": flops, "flops_method": flops_method,
        **payload_bytes(algorithm, batch=batch, smashed_shape=tuple(m.smashed_shape),
                        device_params=device_params, local_steps=local_steps,
                        upload_every=upload_every, smashed_codec=smashed_codec),
        "versions": {**got["versions"], "heron": _heron_version()},
        "machine": machine(),
        "step_ms_samples": [round(t, 3) for t in step_ms],
        "forward_ms_samples": [round(t, 3) for t in fwd_ms],
        "wall_s": round(wall, 2),
        # other processes on the machine skew timings (not memory, FLOPs or bytes): record it
        "load_avg_1min": [load0, load1],
    }


def _load_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _heron_version() -> str:
    try:
        from importlib.metadata import version

        return version("heron-sfl")
    except Exception:  # not installed: running from the checkout
        return "checkout"


def machine() -> dict[str, Any]:
    """Cores, CPU model and memory of this machine, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gb": mem,
            "platform": platform.platform()}


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
