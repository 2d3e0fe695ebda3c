"""Block-wise ZO on the device: the bundle's segment chain with cached activations.

A full-mode step runs the whole client + aux graph twice (θ and θ + μu). A block-wise step
draws segment j first (`zo.BlockSampler`, from the step's seed), runs the chain once at θ keeping
the input of j (and the smashed data), then perturbs segment j only and re-runs segments
j..end from that cached input: the segments before j see the same weights and the same
batch, so their outputs would be identical.
The block-wise estimator itself (its block rule, weights and replay) is in `edge_runtime.zo`.

Torch-free like the rest of the device: ONNX Runtime, one session per segment. The
sessions share one arena (registered once per process), so the chain's working memory is
that of the largest segment plus the cached activations, not the sum over segments; and
they run on the process-wide thread pool (`runtime.session_options`), so one segment's
threads are the next one's. A chain built for another thread count gets a pool per
session, and then those threads do not spin after a run: the pool of the segment that
just finished would otherwise compete for the cores with the pool of the next one.

Where a segment also comes as an NCHWc variant (`exporter.segments`), the chain uses it if
this ONNX Runtime runs it and it reproduces the plain segment on a test batch: the check
finds the CPU's NCHWc block size too (the filters are fed reordered for it), and anything
else (an ONNX Runtime without those kernels, a block size that does not divide the
channels) leaves that segment on its plain graph.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnxruntime as ort

from edge_runtime import zo
from edge_runtime.bundle import Bundle
from edge_runtime.manifest import (
    LABEL_NAME,
    LOSS_OUTPUT,
    NCHWC_LAYOUTS,
    SEGMENT_INPUT,
    SEGMENT_OUTPUT,
    BundleError,
)
from edge_runtime.protocol import ZOConfig

log = logging.getLogger(__name__)

_SHARED_ARENA: list[bool] = []  # registered with the ONNX Runtime environment yet?
_BLOCK_SIZES = (16, 8, 4)  # NCHWc channel blocks ONNX Runtime uses (AVX-512, AVX2/NEON, ...)
_found_block: list[int] = []  # the one that worked on this CPU, once known


def _segment_options(opts: ort.SessionOptions) -> ort.SessionOptions:
    """The device's session options, plus a shared arena (and no spinning if the
    sessions do not share the process pool; module doc)."""
    if not _SHARED_ARENA:
        ort.create_and_register_allocator(ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT), None)
        _SHARED_ARENA.append(True)
    opts.add_session_config_entry("session.use_env_allocators", "1")
    if opts.use_per_session_threads:  # a pool per segment: idle ones must not spin
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def reorder_filter(w: np.ndarray, layout: str, block: int) -> np.ndarray:
    """An OIHW filter in ONNX Runtime's NCHWc filter layout, kept in its OIHW shape:
    OIHWBiBo = [O/b, I/b, H, W, b_in, b_out] (blocked input), OIHWBo = [O/b, I, H, W, b_out]."""
    o, i, kh, kw = w.shape
    if layout == "OIHWBiBo":
        blocked = w.reshape(o // block, block, i // block, block, kh, kw).transpose(
            0, 2, 4, 5, 3, 1)
    else:
        blocked = w.reshape(o // block, block, i, kh, kw).transpose(0, 2, 3, 4, 1)
    return np.ascontiguousarray(blocked).reshape(o, i, kh, kw)


def _fits(layouts: dict[str, str], shapes: dict[str, tuple[int, ...]], block: int) -> bool:
    """Whether `block` divides every filter the way its layout needs (no padding)."""
    for name, layout in layouts.items():
        o, i = shapes[name][:2]
        if o % block or (i % block if layout == "OIHWBiBo" else i >= block):
            return False
    return True


class SegmentChain:
    """One ONNX Runtime session per bundle segment, run from any segment onwards."""

    def __init__(self, bundle: Bundle, opts: ort.SessionOptions) -> None:
        m = bundle.manifest
        opts = _segment_options(opts)
        if not m.segments:
            raise BundleError(
                f"block-wise ZO needs a bundle with segments, and this {m.model}/{m.cut} "
                "bundle has none; help: re-export it with this heron version (`heron "
                "export`; the server does so at start), or train with perturb='full'")
        params = {p.name: p for p in m.params}
        self.blocks: tuple[tuple[int, int], ...] = tuple((s.offset, s.size) for s in m.segments)
        self.names = tuple(s.name for s in m.segments)
        self.sessions: list[ort.InferenceSession] = []
        # per segment: (graph input name, offset inside the segment's slice, shape, NCHWc
        # filter layout or None)
        self.feeds: list[list[tuple[str, int, tuple[int, ...], str | None]]] = []
        self.block_size: int | None = None  # NCHWc channel block, if any segment uses it
        rng = np.random.default_rng(0)
        if m.input_dtype == "int64":  # the check batch: token id 0 everywhere, all attended
            h = np.zeros((2, *m.input_shape), dtype=np.int64)
            h[:, 1] = 1
        else:
            h = rng.standard_normal((2, *m.input_shape)).astype(np.float32)
        # frozen tensors the segments map from the bundle's data, and from nowhere else
        for key, value in bundle.session_config().items():
            opts.add_session_config_entry(key, value)
        y = np.zeros(2, dtype=np.int64)
        for i, (spec, graph) in enumerate(zip(m.segments, bundle.segments, strict=True)):
            last = i == len(m.segments) - 1
            sess = self._load(spec.name, graph, opts, [SEGMENT_INPUT, *(
                [LABEL_NAME] if last else []), *spec.params])
            self.sessions.append(sess)
            self.feeds.append([(n, params[n].offset - spec.offset, params[n].shape, None)
                               for n in spec.params])
            values = self._slice(bundle.weights, i)
            feed = self._feed(i, h, values) | ({LABEL_NAME: y} if last else {})
            out = sess.run(None, feed)[0]
            nchwc = bundle.nchwc_segments[i] if bundle.nchwc_segments else None
            if nchwc is not None:
                self._try_nchwc(i, nchwc, opts, feed, out, {n: params[n].shape
                                                            for n in spec.params})
            h = out

    @staticmethod
    def _load(name: str, graph: bytes, opts: ort.SessionOptions,
              expected: list[str]) -> ort.InferenceSession:
        try:
            sess = ort.InferenceSession(graph, sess_options=opts,
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"ONNX Runtime cannot load segment {name!r}: {exc}") from exc
        if [x.name for x in sess.get_inputs()] != expected:
            raise BundleError(f"segment {name!r} has inputs "
                              f"{[x.name for x in sess.get_inputs()]}, expected {expected}")
        return sess

    def _try_nchwc(self, i: int, graph: bytes, opts: ort.SessionOptions,
                   feed: dict[str, np.ndarray], want: np.ndarray,
                   shapes: dict[str, tuple[int, ...]]) -> None:
        """Switch segment i to its NCHWc variant if it reproduces `want` (plain output on
        `feed`) for some block size; the first size that works is this CPU's."""
        try:
            sess = self._load(self.names[i], graph, opts, list(feed))
            layouts = json.loads(sess.get_modelmeta().custom_metadata_map[NCHWC_LAYOUTS])
        except (BundleError, KeyError, ValueError) as exc:
            log.info("segment %s: NCHWc variant not usable here (%s); plain graph",
                     self.names[i], exc)
            return
        for block in _found_block or _BLOCK_SIZES:
            if not _fits(layouts, shapes, block):
                continue
            trial = {k: reorder_filter(v, layouts[k], block) if k in layouts else v
                     for k, v in feed.items()}
            try:
                got = sess.run(None, trial)[0]
            except Exception:  # ONNX Runtime's kernels reject this block size
                continue
            if got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-4):
                _found_block[:] = [block]
                self.block_size = block
                self.sessions[i] = sess
                self.feeds[i] = [(n, start, shape, layouts.get(n))
                                 for n, start, shape, _ in self.feeds[i]]
                return
        log.info("segment %s: NCHWc variant disagrees with the plain graph here; plain graph",
                 self.names[i])

    @property
    def blocked_input_nchwc(self) -> bool:
        """Whether some segment runs an NCHWc conv on blocked (>= 16-channel) input."""
        return any(layout == "OIHWBiBo" for feed in self.feeds for *_, layout in feed)

    @property
    def nchwc(self) -> tuple[bool, ...]:
        """Which segments run their NCHWc variant."""
        return tuple(any(layout for *_, layout in feed) for feed in self.feeds)

    def __len__(self) -> int:
        return len(self.sessions)

    def _feed(self, i: int, h: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs of segment i: activation h and its params as views into its slice (NCHWc
        filters as reordered copies)."""
        feed = {SEGMENT_INPUT: h}
        for name, start, shape, layout in self.feeds[i]:
            view = values[start:start + int(np.prod(shape, dtype=np.int64))].reshape(shape)
            feed[name] = view if layout is None else reorder_filter(view, layout,
                                                                     self.block_size or 0)
        return feed

    def _slice(self, theta: np.ndarray, i: int) -> np.ndarray:
        offset, size = self.blocks[i]
        return theta[offset:offset + size]

    def prefix(self, theta: np.ndarray, x: np.ndarray, stop: int,
               keep: set[int] | None = None) -> dict[int, np.ndarray]:
        """The inputs of segments 0..stop at θ (that of segment n-1 is the smashed data),
        keeping only those in `keep` and segment stop's (None: all of them)."""
        h, acts = x, {0: x}
        for i in range(stop):
            h = self.sessions[i].run([SEGMENT_OUTPUT], self._feed(i, h, self._slice(theta, i)))[0]
            if keep is None or i + 1 in keep or i + 1 == stop:
                acts[i + 1] = h
        return acts

    def loss_from(self, j: int, h: np.ndarray, theta: np.ndarray, y: np.ndarray,
                  values: np.ndarray | None = None) -> float:
        """l from segment j on, given its input h; segment j's weights are `values` (its
        slice of θ when None), every later segment's come from θ."""
        last = len(self.sessions) - 1
        for i in range(j, last + 1):
            own = values if (i == j and values is not None) else self._slice(theta, i)
            feed = self._feed(i, h, own)
            if i == last:
                feed[LABEL_NAME] = y
                return float(self.sessions[i].run([LOSS_OUTPUT], feed)[0])
            h = self.sessions[i].run([SEGMENT_OUTPUT], feed)[0]
        raise AssertionError("unreachable: the chain ends with the loss segment")


def estimate_step(chain: SegmentChain, theta: np.ndarray, x: np.ndarray, y: np.ndarray,
                  step_seed: int, cfg: ZOConfig, sampler: zo.BlockSampler, *,
                  want_smashed: bool) -> tuple[zo.ZOEstimate, np.ndarray | None]:
    """One block-wise estimate; also the unperturbed smashed data when `want_smashed`.

    The unperturbed pass runs as far as needed: to the loss for forward differences or an
    upload, else (central differences) only up to the deepest block a direction perturbs.
    """
    last = len(chain) - 1
    seeds = zo.direction_seeds(step_seed, cfg.q)
    blocks = np.asarray([sampler.draw(int(s)) for s in seeds], dtype=np.int64)
    full = cfg.scheme == "forward" or want_smashed
    acts = chain.prefix(theta, x, last if full else int(blocks.max()), set(blocks.tolist()))
    loss0 = chain.loss_from(last, acts[last], theta, y) if cfg.scheme == "forward" else None
    est = zo.estimate_blocks(
        lambda j, values: chain.loss_from(j, acts[j], theta, y, values),
        theta, chain.blocks, step_seed, cfg, sampler, loss0)
    return est, (acts[last] if want_smashed else None)
