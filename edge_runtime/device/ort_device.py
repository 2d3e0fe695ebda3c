"""`Device`, the ONNX Runtime device (heron, frozen): the loop (`loop.DeviceLoop`) with a
`runtime.LocalModel`, one thread pool for all its sessions, the dry-run memory check against
the board's budget, and block-wise ZO's sampler carried from round to round; and
`run_device`, what `heron device` runs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import numpy as np

from edge_runtime.algorithms import ONNX_ALGORITHMS
from edge_runtime.bundle import Bundle
from edge_runtime.device.loop import DeviceLoop
from edge_runtime.device.options import DeviceOptions
from edge_runtime.manifest import BundleError
from edge_runtime.profiles import MemoryVerdict, check_bundle_memory
from edge_runtime.protocol import RoundStart, TrainConfig
from edge_runtime.runtime import LocalModel, RoundResult, train_round, use_process_pool
from edge_runtime.transport import Transport
from edge_runtime.zo import BlockSampler

log = logging.getLogger("heron.device")


class Device(DeviceLoop):
    """The ONNX Runtime device (heron, frozen). `devices.torch_device.TorchDevice` reuses
    it and overrides only the model hooks (`_make_model`, `_train`, ...)."""

    algorithms: tuple[str, ...] = ONNX_ALGORITHMS
    checks_memory = True

    def __init__(self, opts: DeviceOptions, transport: Transport | None = None) -> None:
        self.memory: dict[int, float] = {}  # batch -> measured peak RSS MB (this bundle)
        # block-wise ZO: (run id, sampler) where the next round's block draws start
        self.block_sampler: tuple[str, BlockSampler] | None = None
        super().__init__(opts, transport)

    @staticmethod
    def prepare_process(opts: DeviceOptions) -> None:
        """One ONNX Runtime thread pool for all the device's sessions
        (`runtime.use_process_pool`)."""
        use_process_pool(opts.threads)

    def _make_model(self, bundle: Bundle) -> tuple[object, int | None]:
        model = LocalModel(bundle, self.opts.threads)
        model.check_data(self.x, self.y)
        self.memory, self.block_sampler = {}, None  # measured on, and drawn for, the old one
        return model, model.threads

    def _expected_weights(self, cfg: TrainConfig) -> int:
        assert self.bundle is not None
        return self.bundle.manifest.num_params

    def _train(self, msg: RoundStart, cfg: TrainConfig,
               send_smashed: Callable[[int, np.ndarray, np.ndarray], None]) -> RoundResult:
        assert isinstance(self.model, LocalModel)
        # the block sampler's per-block energies carry over between the rounds of one run on
        # one bundle: later rounds draw the blocks that moved the loss more often
        carried = self.block_sampler
        sampler = carried[1] if carried is not None and carried[0] == msg.run_id else None
        result = train_round(self.model, msg.weights.astype(np.float32), self.x, self.y, cfg,
                             round_idx=msg.round, device_id=self.opts.device_id,
                             on_smashed=send_smashed, block_sampler=sampler)
        if result.block_sampler is not None:
            start = sampler.probs() if sampler is not None else None
            log.info("%s: round %d block draw probabilities %s -> %s", self.opts.device_id,
                     msg.round, "uniform" if start is None else np.round(start, 3).tolist(),
                     np.round(result.block_sampler.probs(), 3).tolist())
        self.block_sampler = ((msg.run_id, result.block_sampler)
                              if result.block_sampler is not None else None)
        return result

    def _check_memory(self, batch: int, theta: np.ndarray,
                      cfg: TrainConfig | None) -> MemoryVerdict:
        assert isinstance(self.model, LocalModel)
        before = len(self.memory)
        verdict = check_bundle_memory(self.model, theta, self.x, self.y, batch,
                                      self.opts.profile, known=self.memory, cfg=cfg)
        log.log(logging.INFO if len(self.memory) > before or not verdict.fits else logging.DEBUG,
                "%s: memory check: %s", self.opts.device_id, verdict.message())
        return verdict


def run_device(opts: DeviceOptions, device_cls: type[Device] = Device) -> int:
    """Entry point used by `heron device` (`device_cls`: TorchDevice for `--torch`)."""
    try:
        device_cls.prepare_process(opts)
        device = device_cls(opts)
        return device.run()
    except (BundleError, ValueError, OSError) as exc:  # BrokerError is an OSError
        print(f"heron device: {exc}", file=sys.stderr)
        return 2
