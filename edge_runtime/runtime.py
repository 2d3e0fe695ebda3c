"""Local training on the device: ONNX Runtime forwards driven by the ZO estimator.

`train_round` is the whole of what a device does in a round, with the network kept out:
smashed data leaves through a callback and the result is returned.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_state
import psutil

from edge_runtime import blockzo, zo
from edge_runtime.algorithms import ONNX_ALGORITHMS, algorithm
from edge_runtime.bundle import Bundle
from edge_runtime.data import BatchSampler
from edge_runtime.manifest import INPUT_NAME, LABEL_NAME, LOSS_OUTPUT, SMASHED_OUTPUT, BundleError
from edge_runtime.protocol import ZOConfig
from edge_runtime.protocol.config import TrainConfig
from edge_runtime.tail import TailModel, fixed_batch
from edge_runtime.zo import step_seed

# The ONNX Runtime device runs the registry's ONNX_ALGORITHMS (`edge_runtime.algorithms`);
# the first-order baselines run on the torch device in `devices/torch_device.py`.


_POOL: list[int] = []  # the process-wide intra-op pool's size, once use_process_pool ran


def thread_count(threads: int | None) -> int:
    """The intra-op threads a session gets: the process pool's size if there is one."""
    return _POOL[0] if _POOL else int(threads or os.cpu_count() or 1)


def use_process_pool(threads: int | None) -> int:
    """Make every later ONNX Runtime session of this process share one intra-op pool of
    `threads` threads (default: all cores); returns its size.

    For a process that runs only the device's sessions (`heron device`, the profiler's
    child): the training graph and the block-wise segment chain then take turns on the
    same threads instead of each session having its own pool, whose idle spinning fights
    the next session's for the cores (minilm chain pass, 2 cores: 35 -> 25 ms). ONNX
    Runtime then requires every session of the process to use that pool, so a library
    user who makes sessions of their own should not call this. Once per process."""
    n = int(threads or os.cpu_count() or 1)
    if _POOL:
        if _POOL[0] != n:
            raise RuntimeError(f"this process already has an ONNX Runtime pool of {_POOL[0]} "
                               f"threads; it cannot change to {n}")
        return n
    ort_state.set_global_thread_pool_sizes(n, 1)
    _POOL.append(n)
    return n


def session_options(threads: int | None) -> ort.SessionOptions:
    """The device's ONNX Runtime settings, for the training graph and the segments alike:
    on the process pool if `use_process_pool` ran, else a pool of `threads` per session."""
    opts = ort.SessionOptions()
    if _POOL:
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads = thread_count(threads)
        opts.inter_op_num_threads = 1
    # No memory pattern: with it ORT keeps one block sized for every intermediate of the
    # planned run; without, tensors come from the arena and are reused as they die. On
    # resnet18/layer1 at batch 64 that is ~50 MB less peak RSS (-25%) for ~2% step time.
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    return opts


def tail_session_options(threads: int | None) -> ort.SessionOptions:
    """`session_options` for the heron-tail graph, with ORT's CPU arena and weight
    prepacking off: the graph's backward makes many short-lived tensors, which the arena
    keeps at their high-water mark, and prepacking copies every frozen weight the graph
    reads from the (memory-mapped) bundle. minilm/layer5, batch 16, one thread: a 20-step
    round's peak RSS 215 -> 191 MB for ~8% step time (BENCHMARKS.md, heron-tail's cost)."""
    opts = session_options(threads)
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def open_session(bundle: Bundle, opts: ort.SessionOptions | None = None,
                 graph: bytes | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session over the bundle's training graph (or `graph`, another graph
    of the bundle). External graph data (GRAPH_DATA) is memory-mapped from the bundle's
    directory, never read into memory, and no other folder is searched
    (`Bundle.session_config`)."""
    opts = opts or ort.SessionOptions()
    for key, value in bundle.session_config().items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(bundle.graph if graph is None else graph, sess_options=opts,
                                providers=["CPUExecutionProvider"])


class LocalModel:
    """An ONNX Runtime session over the bundle's training graph with weights as inputs;
    the segment chain for block-wise ZO is built the first time a round asks for it."""

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.threads = thread_count(threads)
        self._chain: blockzo.SegmentChain | None = None
        self._tail: TailModel | None = None
        self._fast: bool | None = None  # fast_chain's answer, once known
        self._session: ort.InferenceSession | None = None
        if bundle.manifest.tail is None:
            self._open()
        else:
            # A heron-tail bundle: its device steps only the tail graph, so that one is
            # opened (and checked) now and the training graph only if something runs it;
            # both sessions at once cost ~60 MB more peak RSS on minilm/layer5.
            self.tail()

    @property
    def session(self) -> ort.InferenceSession:
        """The training graph's session (opened on first use for a heron-tail bundle)."""
        return self._session if self._session is not None else self._open()

    def _open(self) -> ort.InferenceSession:
        try:
            session = open_session(self.bundle, session_options(self.threads))
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"ONNX Runtime cannot load the bundle's graph: {exc}") from exc
        names = {i.name for i in session.get_inputs()}
        expected = {INPUT_NAME, LABEL_NAME, *(p.name for p in self.bundle.manifest.params)}
        if names != expected:
            raise BundleError(f"graph inputs {sorted(names)} do not match the manifest "
                              f"{sorted(expected)}")
        self._session = session
        return session

    def check_data(self, x: np.ndarray, y: np.ndarray) -> None:
        """Refuse a shard that does not fit the bundle, before any training."""
        m = self.bundle.manifest
        if x.dtype != np.dtype(m.input_dtype):
            raise ValueError(f"shard samples have dtype {x.dtype} but the bundle ({m.model}) "
                             f"expects {m.input_dtype}; help: partition the same dataset "
                             "the server uses")
        if tuple(x.shape[1:]) != tuple(m.input_shape):
            raise ValueError(f"shard samples have shape {tuple(x.shape[1:])} but the bundle "
                             f"({m.model}) expects {tuple(m.input_shape)}; help: partition "
                             "the same dataset the server uses")
        if y.size and (int(y.max()) >= m.num_classes or int(y.min()) < 0):
            raise ValueError(f"shard has labels in {int(y.min())}..{int(y.max())} but the "
                             f"bundle has {m.num_classes} classes (0..{m.num_classes - 1})")

    def run(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray,
            outputs: tuple[str, ...] = (LOSS_OUTPUT,)) -> list[np.ndarray]:
        feeds = {INPUT_NAME: x, LABEL_NAME: y, **self.bundle.unflatten(theta)}
        return self.session.run(list(outputs), feeds)

    def loss(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.run(theta, x, y)[0])

    def chain(self) -> blockzo.SegmentChain:
        """The bundle's segments, one session each (BundleError if it has none)."""
        if self._chain is None:
            self._chain = blockzo.SegmentChain(self.bundle, session_options(self.threads))
        return self._chain

    def tail(self) -> TailModel:
        """The bundle's tail-gradient graph (`heron-tail`; BundleError if it has none)."""
        if self._tail is None:
            self._tail = TailModel(self.bundle, tail_session_options(self.threads),
                                   lambda graph, opts: open_session(self.bundle, opts, graph))
        return self._tail

    def fast_chain(self) -> blockzo.SegmentChain | None:
        """The segment chain if it computes the graph faster than the graph itself, else
        None: when some segment runs ONNX Runtime's NCHWc convolutions on blocked input
        (>= 16 channels), which the one-graph session cannot use with filters as inputs
        (resnet18/layer1, batch 64: one pass 225 -> 180 ms). A conv on a few input channels
        (cnn/conv1 on 1-channel images) gains nothing there, so such a model stays on its
        graph. Full-perturbation steps then make their passes on the chain: the same
        function, checked against the plain graph when the chain loads."""
        if self._fast is None:
            m = self.bundle.manifest
            self._fast = (any(s.nchwc_file for s in m.segments)
                          and self.chain().blocked_input_nchwc)
        return self.chain() if self._fast else None


_PEAK_SAMPLED = [0.0]


def rss_mb() -> float:
    """Resident memory of this process now (psutil), and remember it as a peak sample."""
    now = psutil.Process().memory_info().rss / 2**20
    _PEAK_SAMPLED[0] = max(_PEAK_SAMPLED[0], now)
    return now


def peak_rss_mb() -> float:
    """Peak resident memory of this whole process, as the OS reports it.

    Linux keeps the high-water mark in /proc/self/status (VmHWM), reset at exec. We do not
    use getrusage's ru_maxrss: Linux carries it across fork+exec, so a device started by
    a large parent (e.g. `heron run`) would report the parent's peak. Elsewhere we fall
    back to the largest psutil sample taken after each training step.
    """
    rss_mb()
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return max(int(line.split()[1]) / 1024.0, _PEAK_SAMPLED[0])
    except OSError:
        pass
    return _PEAK_SAMPLED[0]


@dataclass(frozen=True)
class RoundResult:
    theta: np.ndarray
    seeds: np.ndarray  # uint64, one per (step, direction)
    projected: np.ndarray  # float32, matching seeds (block-wise: weighted by 1/p_j)
    losses: list[float]  # l(θ) at each step
    step_ms: list[float]
    smashed_sent: int
    # perturb="block": the segment each direction perturbed, matching seeds (each seed also
    # carries it, zo.seed_block, so the wire log needs nothing more), and the block sampler
    # to start the device's next round from
    blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    block_sampler: zo.BlockSampler | None = None


def train_round(
    model: LocalModel,
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    *,
    round_idx: int,
    device_id: str,
    on_smashed: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    block_sampler: zo.BlockSampler | None = None,
) -> RoundResult:
    """h ZO steps from θ on the local shard; every k steps the unperturbed pass's
    activations go to `on_smashed(step, activations, labels)`.

    Block-wise (cfg.zo.perturb == "block"), `block_sampler` is where block draws start:
    the previous round's `RoundResult.block_sampler` on the same bundle, or None (uniform).
    """
    if algorithm(cfg.algorithm).runtime != "onnxruntime":
        raise ValueError(f"algorithm {cfg.algorithm!r} needs a first-order device; this ONNX "
                         f"Runtime device runs {', '.join(ONNX_ALGORITHMS)}. help: start "
                         "the device with `heron device --torch` (needs torch installed)")
    update = algorithm(cfg.algorithm).device_update
    trains = update == "zo"  # else frozen: forwards only (or the tail's own round)
    if not np.all(np.isfinite(theta)):
        raise ValueError("the starting weights contain NaN or Inf; refusing to train on them")
    sampler = BatchSampler(len(y), cfg.batch_size,
                           np.random.default_rng([cfg.seed, round_idx,
                                                  zlib.crc32(device_id.encode())]))
    if update == "tail":
        return _tail_round(model.tail(), theta, x, y, cfg, sampler, on_smashed)
    state = zo.init_state(theta, cfg.optimizer)
    seeds, projected, losses, times = [], [], [], []
    blocks: list[int] = []
    draw = block_sampler  # block-wise: which block each direction perturbs
    sent = 0
    for step in range(cfg.local_steps):
        t0 = time.perf_counter()
        idx = sampler.next_indices()
        xb, yb = x[idx], y[idx]
        upload = on_smashed is not None and step % cfg.upload_every == 0
        if not trains:  # frozen, the reviewers' baseline: smashed data, no update
            if upload:
                outs = model.run(theta, xb, yb, (LOSS_OUTPUT, SMASHED_OUTPUT))
                assert on_smashed is not None
                on_smashed(step, outs[1], yb)
                sent += 1
                losses.append(float(outs[0]))
            times.append((time.perf_counter() - t0) * 1000.0)
            continue
        seed = step_seed(cfg.seed, round_idx, device_id, step)
        if cfg.zo.perturb == "block":  # re-run from one segment on (edge_runtime.blockzo)
            chain = model.chain()
            sizes = [size for _, size in chain.blocks]
            if draw is None or list(draw.sizes) != sizes:
                draw = zo.BlockSampler.start(sizes)
            est, smashed = blockzo.estimate_step(chain, theta, xb, yb, seed, cfg.zo, draw,
                                                 want_smashed=upload)
            draw = draw.observe(est.blocks, est.projected * est.probs, cfg.zo)
            loss = est.loss
        else:
            est, smashed, loss = _full_estimate(model, theta, xb, yb, seed, cfg.zo, upload)
        if upload:
            assert on_smashed is not None and smashed is not None
            on_smashed(step, smashed, yb)
            sent += 1
        if not np.all(np.isfinite(est.grad)):
            raise FloatingPointError(
                f"ZO estimate at step {step} is not finite (loss {est.loss}); help: lower "
                "the device learning rate or mu")
        # Block-wise: the gradient is zero outside the perturbed block and Adam runs over all
        # of θ as usual: its m and v stay time averages of the (unbiased, 1/p_j-weighted)
        # estimate, and with p_j following the blocks' gradient energy every block moves as
        # under the full estimate (zo module doc). A lazy update of the drawn block alone
        # would instead slow each block down to its draw rate p_j.
        theta, state = zo.apply(theta, est.grad, state, cfg.optimizer)
        seeds.extend(est.seeds.tolist())
        projected.extend(est.projected.tolist())
        blocks.extend(est.blocks.tolist())
        losses.append(loss)
        times.append((time.perf_counter() - t0) * 1000.0)
        rss_mb()
    return RoundResult(theta, np.asarray(seeds, dtype=np.uint64),
                       np.asarray(projected, dtype=np.float32), losses, times, sent,
                       np.asarray(blocks, dtype=np.int64), draw)


def _tail_round(tail: TailModel, theta: np.ndarray, x: np.ndarray, y: np.ndarray,
                cfg: TrainConfig, sampler: BatchSampler,
                on_smashed: Callable[[int, np.ndarray, np.ndarray], None] | None
                ) -> RoundResult:
    """heron-tail's round: each step one run of the tail graph (loss, smashed, exact
    gradients of the trained params) and an optimizer step on those params alone; the rest
    of θ is frozen. Smashed data of the batch's real samples (not the padding) every k."""
    if cfg.batch_size != tail.batch:
        raise ValueError(f"the bundle's tail graph was exported for batch {tail.batch}, the "
                         f"round asks for {cfg.batch_size}; help: the server exports it with "
                         "the run's --batch-size")
    theta = theta.copy()
    trained = tail.gather(theta)
    state = zo.init_state(trained, cfg.optimizer)
    losses, times, sent = [], [], 0
    for step in range(cfg.local_steps):
        t0 = time.perf_counter()
        idx = sampler.next_indices()
        full = fixed_batch(idx, tail.batch)
        loss, smashed, grad = tail.step(theta, x[full], y[full])
        if on_smashed is not None and step % cfg.upload_every == 0:
            on_smashed(step, smashed[:len(idx)], y[idx])
            sent += 1
        if not np.all(np.isfinite(grad)):
            raise FloatingPointError(f"tail gradient at step {step} is not finite (loss "
                                     f"{loss}); help: lower the device learning rate")
        trained, state = zo.apply(trained, grad, state, cfg.optimizer)
        tail.scatter(theta, trained)
        losses.append(loss)
        times.append((time.perf_counter() - t0) * 1000.0)
        rss_mb()
    empty = np.zeros(0)
    return RoundResult(theta, empty.astype(np.uint64), empty.astype(np.float32), losses, times,
                       sent)


def _full_estimate(model: LocalModel, theta: np.ndarray, xb: np.ndarray, yb: np.ndarray,
                   seed: int, cfg: ZOConfig, upload: bool
                   ) -> tuple[zo.ZOEstimate, np.ndarray | None, float]:
    """The paper's step: whole-graph evaluations at θ and θ + μu; (estimate, smashed data
    if `upload`, the step's recorded loss)."""
    smashed = None
    loss0: float | None = None
    chain = model.fast_chain()
    if cfg.scheme == "forward" or upload:
        if chain is None:
            outs = model.run(theta, xb, yb, (LOSS_OUTPUT, SMASHED_OUTPUT) if upload
                             else (LOSS_OUTPUT,))
            loss0, smashed = float(outs[0]), (outs[1] if upload else None)
        else:
            last = len(chain) - 1
            h = chain.prefix(theta, xb, last, set())[last]  # the aux head's input: smashed
            loss0, smashed = chain.loss_from(last, h, theta, yb), (h if upload else None)
    f = ((lambda t: model.loss(t, xb, yb)) if chain is None
         else (lambda t: chain.loss_from(0, xb, t, yb)))
    est = zo.estimate(f, theta, seed, cfg, loss0 if cfg.scheme == "forward" else None)
    return est, smashed, (est.loss if loss0 is None else loss0)
