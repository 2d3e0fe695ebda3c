"""One device training step per algorithm, for profiling (never used by a federation).

Every runner holds one fixed random batch of the profiled size and times the device's
compute between two steps, the network left out: a step that would publish or wait for a
message hands the array to a no-op instead. Each step draws a fresh permutation of the batch,
as a device's sampler does.

- ``heron``: ONNX Runtime from the exported bundle, through edge_runtime's own
  ``train_round`` (so ``LocalModel.run``, ``zo.estimate`` and ``zo.apply`` exactly as a
  device runs them, smashed data requested every k-th step). ``perturb="block"``: the same
  with block-wise ZO, i.e. the bundle's segment chain (``edge_runtime.blockzo``).
- ``frozen``: the same bundle and session, one forward per step for the smashed data, no
  update. Like ``heron`` it needs no torch.
- ``cse-fsl``: torch forward, backward and Adam step of client + aux head on the local loss.
- ``sflv1``, ``sflv2``: torch client forward, backward of a (server-provided) cut-layer
  gradient, Adam step. V1 and V2 differ only on the server, so the device step is the same.
- ``fedavg``: the whole model forward, backward and Adam step on the device.

Every runner that uploads smashed data codes it as the device does: the `Smashed` message
under ``smashed_codec`` (`edge_runtime.protocol.smashed_codec`), encoded and chunked for the
wire (what the MQTT transport does before paho gets the bytes), on the device's uplink
thread (`edge_runtime.uplink`), whose drain at the end of each timed call is added
to the call's last step; ``uplink="inline"`` codes inside the step instead (the device
before that thread, kept as a baseline).

Only the ONNX Runtime runners may be built in a process that must stay torch-free; torch is
imported inside the torch runner.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np

from edge_runtime.algorithms import ALGORITHMS, ONNX_ALGORITHMS, TORCH_ALGORITHMS, algorithm
from edge_runtime.protocol.config import PERTURBS
from edge_runtime.protocol.smashed_codec import CODECS, DEFAULT_CODEC

__all__ = ["ALGORITHMS", "ONNX_ALGORITHMS", "TORCH_ALGORITHMS", "StepSpec", "make_runner"]
TORCH_LR = 1e-3  # irrelevant to cost; Adam does the same work at any learning rate
# where smashed uploads are coded: on the device's uplink thread (edge_runtime.uplink,
# what `heron device` does) or inside the step (the device before that thread: a baseline)
UPLINKS = ("thread", "inline")


@dataclass(frozen=True)
class StepSpec:
    """Everything a (child) process needs to rebuild the same step."""

    algorithm: str
    model: str
    cut: str
    batch: int
    threads: int
    input_shape: tuple[int, ...]  # per sample: (C, H, W) images, (2, L) text
    num_classes: int
    upload_every: int = 2  # k: the smashed data leave every k-th step
    local_steps: int = 40  # h: steps per round (block-wise heron draws blocks per round)
    seed: int = 0
    bundle_dir: str | None = None  # required by the ONNX Runtime algorithms
    perturb: str = "full"  # heron's ZO perturbation: full (the paper) or block (blockzo)
    input_dtype: str = "float32"  # "int64": token ids and attention mask (text models)
    q: int = 1  # heron: ZO directions per step (each one more forward, or block re-run)
    smashed_codec: str = DEFAULT_CODEC  # how smashed uploads are coded (smashed_codec.CODECS)
    uplink: str = "thread"  # UPLINKS: "inline" codes inside the step (a baseline, no device)

    def __post_init__(self) -> None:
        alg = algorithm(self.algorithm)  # ValueError naming the choices
        for name in ("batch", "threads", "upload_every", "local_steps", "num_classes", "q"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if alg.runtime == "onnxruntime" and not self.bundle_dir:
            raise ValueError(f"{self.algorithm} runs from an exported bundle; pass bundle_dir")
        if self.perturb not in PERTURBS:
            raise ValueError(f"perturb must be one of {', '.join(PERTURBS)}, got "
                             f"{self.perturb!r}")
        if self.input_dtype not in ("float32", "int64"):
            raise ValueError(f"input_dtype must be float32 or int64, got {self.input_dtype!r}")
        if self.uplink not in UPLINKS:
            raise ValueError(f"uplink must be one of {', '.join(UPLINKS)}, got {self.uplink!r}")
        if self.smashed_codec not in CODECS:
            raise ValueError(f"unknown smashed codec {self.smashed_codec!r}; help: one of "
                             f"{', '.join(CODECS)}")
        if self.perturb != "full" and alg.device_update != "zo":
            raise ValueError(f"perturb={self.perturb!r} is a heron option; {self.algorithm} "
                             "makes no ZO perturbation")
        if self.q != 1 and alg.device_update != "zo":
            raise ValueError(f"q={self.q} is a heron option; {self.algorithm} makes no ZO "
                             "perturbation")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(obj: dict[str, Any]) -> StepSpec:
        fields = dict(obj)
        fields["input_shape"] = tuple(int(s) for s in fields["input_shape"])
        return StepSpec(**fields)


class Runner(Protocol):
    forwards_per_step: int  # forward passes of the network inside one step
    steps_per_call: int  # consecutive steps to time at once (then as many forwards)

    def steps(self, n: int) -> list[float]:
        """Run n consecutive steps (step indices 0..n-1); milliseconds per step."""
        ...

    def forwards(self, n: int) -> list[float]:
        """The plain forward passes of n such steps, fixed weights; milliseconds per step."""
        ...


TOKEN_RANGE = (1000, 2000)  # ordinary word-piece ids in any BERT-style vocabulary


def random_batch(spec: StepSpec) -> tuple[np.ndarray, np.ndarray]:
    """The profiled batch: values do not matter for cost, only shapes and dtypes.

    Text (int64, (2, L) per sample): random token ids and an all-ones attention mask, so
    every one of the L positions is a real token (padding would cost the same)."""
    rng = np.random.default_rng(spec.seed)
    if spec.input_dtype == "int64":
        x = np.ones((spec.batch, *spec.input_shape), dtype=np.int64)
        x[:, 0] = rng.integers(*TOKEN_RANGE, (spec.batch, *spec.input_shape[1:]))
    else:
        x = rng.standard_normal((spec.batch, *spec.input_shape), dtype=np.float32)
    y = rng.integers(0, spec.num_classes, spec.batch).astype(np.int64)
    return x, y


def wire_smashed(spec: StepSpec, step: int, activations: np.ndarray,
                 labels: np.ndarray) -> list[bytes]:
    """What a device does with one smashed batch before publishing it (edge_runtime's
    device loop and transport): code it under the spec's codec, encode, chunk."""
    from edge_runtime.protocol import Smashed, chunk, encode

    msg = Smashed.coded("0" * 32, 1, "profile", step, activations, labels, spec.smashed_codec)
    return chunk(encode(msg), msg.msg_id)


class Uploads:
    """A runner's smashed uploads, made as the device makes them: `wire_smashed` on the
    device's `Uplink` thread, or in the step (spec.uplink == "inline"). `drain_ms` waits for
    the thread at the end of a timed call; the runners add that wait to the call's last
    step, so a step's time holds whatever of the coding its successors did not hide (a
    device drains only at the end of a round: this is the conservative side)."""

    def __init__(self, spec: StepSpec) -> None:
        from edge_runtime.uplink import make_uplink

        self.spec = spec
        self.last: list[bytes] | None = None  # the last upload, as chunks for the wire
        self._uplink = make_uplink(self._wire, spec.uplink == "thread")
        self.send = self._uplink.send

    def _wire(self, step: int, activations: np.ndarray, labels: np.ndarray) -> None:
        self.last = wire_smashed(self.spec, step, activations, labels)  # then publish

    def drain_ms(self) -> float:
        t0 = time.perf_counter()
        self._uplink.flush()
        return (time.perf_counter() - t0) * 1000.0


def drained(times: list[float], uploads: Uploads) -> list[float]:
    """`times` with the uplink's drain added to the last step."""
    times = list(times)
    times[-1] += uploads.drain_ms()
    return times


def make_runner(spec: StepSpec) -> Runner:
    a = algorithm(spec.algorithm)
    if a.runtime == "torch":
        return TorchRunner(spec)
    if a.device_update == "tail":
        return TailRunner(spec)
    return HeronRunner(spec) if a.device_update == "zo" else FrozenRunner(spec)


# -- ONNX Runtime (torch-free) -----------------------------------------------------------------
class _OrtBase:
    def __init__(self, spec: StepSpec) -> None:
        from edge_runtime.bundle import load_bundle
        from edge_runtime.runtime import LocalModel

        assert spec.bundle_dir is not None  # checked by StepSpec
        self.spec = spec
        self.bundle = load_bundle(spec.bundle_dir)
        m = self.bundle.manifest
        if (m.model, m.cut, tuple(m.input_shape), m.num_classes) != (
                spec.model, spec.cut, spec.input_shape, spec.num_classes):
            raise ValueError(f"bundle {spec.bundle_dir} is {m.model}/{m.cut} on "
                             f"{tuple(m.input_shape)} with {m.num_classes} classes, not "
                             f"{spec.model}/{spec.cut} on {spec.input_shape} with "
                             f"{spec.num_classes}; help: export the bundle for this profile")
        self.model = LocalModel(self.bundle, spec.threads)
        self.x, self.y = random_batch(spec)
        self.model.check_data(self.x, self.y)
        self.theta = self.bundle.weights.copy()
        self.uploads = Uploads(spec)

    def _feeds(self) -> dict[str, np.ndarray]:
        from edge_runtime.manifest import INPUT_NAME, LABEL_NAME

        return {INPUT_NAME: self.x, LABEL_NAME: self.y, **self.bundle.unflatten(self.theta)}

    def _timed_passes(self, n: int, passes: list[list[tuple[str, ...]]]) -> list[float]:
        """Run the given output lists per step on fixed feeds, timing each step's set."""
        feeds = self._feeds()
        run = self.model.session.run
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            for outputs in passes[i]:
                run(list(outputs), feeds)
            times.append((time.perf_counter() - t0) * 1000.0)
        return times


class HeronRunner(_OrtBase):
    """The device's ZO step, through `edge_runtime.runtime.train_round` itself.

    Its forwards: the same ONNX Runtime passes on fixed weights. Block-wise, those are the
    segment chain's unperturbed pass and the re-run from each step's drawn block (the
    blocks of the steps just timed), so step / forwards is the ZO bookkeeping either way.
    Block-wise steps are timed a whole round (h steps) at a time: the block sampler starts
    each round uniform and learns the blocks' gradient energies, as on a device.
    """

    def __init__(self, spec: StepSpec) -> None:
        super().__init__(spec)
        from edge_runtime.protocol import TrainConfig, ZOConfig

        # The device's defaults (forward differences, Gaussian directions, Adam), q as given.
        self.cfg = TrainConfig(local_steps=1, upload_every=spec.upload_every,
                               batch_size=spec.batch, seed=spec.seed,
                               zo=ZOConfig(perturb=spec.perturb, q=spec.q))
        self.round = 0
        self.forwards_per_step = len(self._passes(1))
        self.steps_per_call = spec.local_steps if spec.perturb == "block" else spec.upload_every
        self.blocks: list[int] = []  # block-wise: the blocks the last steps drew
        self.drawn: list[int] = []  # and every step's so far
        self.block_sampler: Any = None  # carried from round to round, as a device does
        if spec.perturb == "block":
            self.model.chain()  # build the segment sessions now, not inside a timed step
        # full perturbation runs its passes on the segment chain where that is faster
        # (NCHWc convolutions); its forwards are then timed on the chain too
        self.fast_chain = self.model.fast_chain() if spec.perturb == "full" else None

    @property
    def chain_info(self) -> dict[str, Any] | None:
        """The segment chain the steps ran on, if any: its segments, which run NCHWc, and
        (block-wise) how often each was drawn."""
        if self.spec.perturb != "block":
            chain = self.fast_chain
            if chain is None:
                return None
            return {"segments": list(chain.names), "nchwc": list(chain.nchwc),
                    "nchwc_block": chain.block_size, "full_passes_on_chain": True}
        chain = self.model.chain()
        return {"segments": list(chain.names), "nchwc": list(chain.nchwc),
                "nchwc_block": chain.block_size,
                "draws": np.bincount(self.drawn, minlength=len(chain)).tolist()}

    def _passes(self, step: int) -> list[tuple[str, ...]]:
        """The outputs of each forward pass train_round makes at `step` (with uploads on)."""
        from edge_runtime.manifest import LOSS_OUTPUT, SMASHED_OUTPUT

        upload = step % self.cfg.upload_every == 0
        zc = self.cfg.zo
        passes: list[tuple[str, ...]] = []
        if zc.scheme == "forward" or upload:
            passes.append((LOSS_OUTPUT, SMASHED_OUTPUT) if upload else (LOSS_OUTPUT,))
        per_direction = 1 if zc.scheme == "forward" else 2
        passes += [(LOSS_OUTPUT,)] * (zc.q * per_direction)
        return passes

    def steps(self, n: int) -> list[float]:
        from edge_runtime.runtime import train_round

        res = train_round(self.model, self.theta, self.x, self.y,
                          replace(self.cfg, local_steps=n), round_idx=self.round,
                          device_id="profile", on_smashed=self.uploads.send,
                          block_sampler=self.block_sampler)
        self.theta, self.block_sampler = res.theta, res.block_sampler
        self.round += 1
        self.blocks = res.blocks.tolist()
        self.drawn += self.blocks
        return drained(res.step_ms, self.uploads)

    def forwards(self, n: int) -> list[float]:
        if self.spec.perturb == "block":
            return self._block_forwards(n)
        if self.fast_chain is not None:
            return self._chain_forwards(n)
        return self._timed_passes(n, [self._passes(i) for i in range(n)])

    def _chain_forwards(self, n: int) -> list[float]:
        """Full perturbation on the segment chain: the same passes on fixed weights."""
        from edge_runtime.manifest import SMASHED_OUTPUT

        chain = self.fast_chain
        assert chain is not None
        last = len(chain) - 1
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            for outputs in self._passes(i):
                if SMASHED_OUTPUT in outputs:
                    h = chain.prefix(self.theta, self.x, last, set())[last]
                    chain.loss_from(last, h, self.theta, self.y)
                else:
                    chain.loss_from(0, self.x, self.theta, self.y)
            times.append((time.perf_counter() - t0) * 1000.0)
        return times

    def _block_forwards(self, n: int) -> list[float]:
        chain = self.model.chain()
        last = len(chain) - 1
        q = self.cfg.zo.q
        blocks = self.blocks or list(range(len(chain)))  # q per step, as the steps drew them
        times = []
        for i in range(n):
            drawn = [blocks[(i * q + d) % len(blocks)] for d in range(q)]
            t0 = time.perf_counter()
            acts = chain.prefix(self.theta, self.x, last, set(drawn))
            chain.loss_from(last, acts[last], self.theta, self.y)
            for j in drawn:
                chain.loss_from(j, acts[j], self.theta, self.y)
            times.append((time.perf_counter() - t0) * 1000.0)
            del acts  # as in a step: not alive while the next pass runs
        return times


class FrozenRunner(_OrtBase):
    """A device that never trains: one forward for the smashed data per step."""

    forwards_per_step = 1

    @property
    def steps_per_call(self) -> int:
        return self.spec.upload_every

    def steps(self, n: int) -> list[float]:
        from edge_runtime.manifest import SMASHED_OUTPUT

        rng = np.random.default_rng([self.spec.seed, 1])
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            idx = rng.permutation(self.spec.batch)
            act = self.model.run(self.theta, self.x[idx], self.y[idx], (SMASHED_OUTPUT,))[0]
            self.uploads.send(0, act, self.y[idx])
            times.append((time.perf_counter() - t0) * 1000.0)
        return drained(times, self.uploads)

    def forwards(self, n: int) -> list[float]:
        from edge_runtime.manifest import SMASHED_OUTPUT

        return self._timed_passes(n, [[(SMASHED_OUTPUT,)]] * n)


class TailRunner(_OrtBase):
    """heron-tail's step through `train_round` itself: the bundle's tail graph (loss, smashed,
    exact gradients) and numpy Adam on the trained tensors. Its "forward" is the same tail
    graph run on fixed weights (every output), so step / forwards is the update's cost; the
    training graph is never opened, as a heron-tail device never opens it (its session
    would add ~60 MB to the peak RSS measured here on minilm/layer5). Compare the step with
    frozen's profile for its cost over one plain forward."""

    forwards_per_step = 1

    def __init__(self, spec: StepSpec) -> None:
        super().__init__(spec)
        from edge_runtime.algorithms import DEVICE_LR
        from edge_runtime.protocol import OptimizerConfig, TrainConfig

        self.cfg = TrainConfig(algorithm=spec.algorithm, local_steps=1,
                               upload_every=spec.upload_every, batch_size=spec.batch,
                               seed=spec.seed, optimizer=OptimizerConfig(lr=DEVICE_LR["tail"]))
        self.round = 0
        self.model.tail()  # its session is made now, not inside a timed step

    @property
    def steps_per_call(self) -> int:
        return self.spec.upload_every

    def steps(self, n: int) -> list[float]:
        from edge_runtime.runtime import train_round

        res = train_round(self.model, self.theta, self.x, self.y,
                          replace(self.cfg, local_steps=n), round_idx=self.round,
                          device_id="profile", on_smashed=self.uploads.send)
        self.theta = res.theta
        self.round += 1
        return drained(res.step_ms, self.uploads)

    def forwards(self, n: int) -> list[float]:
        tail = self.model.tail()
        theta = self.bundle.weights.copy()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            tail.step(theta, self.x, self.y)
            times.append((time.perf_counter() - t0) * 1000.0)
        return times


# -- PyTorch --------------------------------------------------------------------------------
class TorchRunner:
    """First-order device steps in eager PyTorch (CPU), Adam on the trained modules."""

    forwards_per_step = 1

    def __init__(self, spec: StepSpec) -> None:
        import torch

        self.steps_per_call = spec.upload_every
        from exporter.zoo import build_split

        torch.set_num_threads(spec.threads)
        self.torch = torch
        self.spec = spec
        split = build_split(spec.model, spec.input_shape, spec.num_classes, cut=spec.cut,
                            seed=spec.seed)
        self.split = split
        self.alg = algorithm(spec.algorithm)
        self.modules = [getattr(split, part) for part in self.alg.trained_parts]
        # frozen base weights (minilm: everything but the LoRA adapters) take no step
        params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in params)
        self.opt = torch.optim.Adam(params, lr=TORCH_LR)
        x, y = random_batch(spec)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        rng = np.random.default_rng([spec.seed, 2])
        # SplitFed: the server sends dL/d(smashed) back each step; any values cost the same.
        self.cut_grad = torch.from_numpy(1e-3 * rng.standard_normal(
            (spec.batch, *split.smashed_shape), dtype=np.float32))
        self.rng = np.random.default_rng([spec.seed, 1])
        self.uploads = Uploads(spec)

    def _step(self, step: int) -> None:
        torch = self.torch
        F = torch.nn.functional
        s = self.split
        idx = torch.from_numpy(self.rng.permutation(self.spec.batch))
        xb, yb = self.x[idx], self.y[idx]
        self.opt.zero_grad(set_to_none=True)
        if self.alg.aux_loss:  # cse-fsl
            smashed = s.client(xb)
            F.cross_entropy(s.aux(smashed), yb).backward()
            if step % self.spec.upload_every == 0:
                self.uploads.send(step, smashed.detach().numpy(), yb.numpy())
        elif self.alg.waits_for_gradient:  # SplitFed
            smashed = s.client(xb)
            # published every step, before the gradient returns
            self.uploads.send(step, smashed.detach().numpy(), yb.numpy())
            smashed.backward(self.cut_grad)
        else:  # fedavg: the whole model
            F.cross_entropy(s.server(s.client(xb)), yb).backward()
        self.opt.step()

    def _forward(self) -> None:
        s = self.split
        if self.alg.aux_loss:
            s.aux(s.client(self.x))
        elif self.alg.ships_server_part:
            s.server(s.client(self.x))
        else:
            s.client(self.x)

    def steps(self, n: int) -> list[float]:
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            self._step(i)
            times.append((time.perf_counter() - t0) * 1000.0)
        return drained(times, self.uploads)

    def forwards(self, n: int) -> list[float]:
        times = []
        with self.torch.no_grad():
            for _ in range(n):
                t0 = time.perf_counter()
                self._forward()
                times.append((time.perf_counter() - t0) * 1000.0)
        return times

    def count_flops(self) -> int:
        """FLOPs of one step as torch's FlopCounterMode counts them (forward and backward)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self._step(1)
        return int(counter.get_total_flops())
