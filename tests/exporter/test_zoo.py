"""Model zoo: cut shapes, split/unsplit equivalence and seeded determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exporter.zoo import (
    DEFAULT_CUTS,
    IMAGE_MODELS,
    MODELS,
    SplitModel,
    build_split,
    default_model,
    full_forward,
)

CASES: list[tuple[str, tuple[int, int, int], str, tuple[int, ...]]] = [
    ("cnn", (1, 8, 8), "conv1", (16, 8, 8)),
    ("cnn", (1, 8, 8), "conv2", (32, 4, 4)),
    ("cnn", (1, 28, 28), "conv1", (16, 28, 28)),
    ("cnn", (1, 28, 28), "conv2", (32, 14, 14)),
    ("fedcnn", (1, 28, 28), "conv1", (32, 14, 14)),
    ("fedcnn", (1, 28, 28), "conv2", (64, 7, 7)),
    ("fedcnn", (3, 32, 32), "conv2", (64, 8, 8)),
    ("fedcnn", (1, 9, 11), "conv2", (64, 2, 2)),
    ("resnet18", (3, 32, 32), "stem", (64, 32, 32)),
    ("resnet18", (3, 32, 32), "layer1", (64, 32, 32)),
    ("resnet18", (3, 32, 32), "layer2", (128, 16, 16)),
]
NUM_CLASSES = 10


def _state(split: SplitModel) -> dict[str, torch.Tensor]:
    parts = {"client": split.client, "aux": split.aux, "server": split.server}
    return {f"{k}.{n}": t for k, m in parts.items() for n, t in m.state_dict().items()}


@pytest.mark.parametrize(("model", "shape", "cut", "smashed"), CASES)
def test_smashed_and_logits_shapes(
    model: str, shape: tuple[int, int, int], cut: str, smashed: tuple[int, ...]
) -> None:
    split = build_split(model, shape, NUM_CLASSES, cut=cut)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        s = split.client(x)
        assert tuple(s.shape) == (3, *smashed)
        assert split.smashed_shape == smashed
        assert tuple(split.aux(s).shape) == (3, NUM_CLASSES)
        assert tuple(split.server(s).shape) == (3, NUM_CLASSES)
    assert (split.model, split.cut, split.input_shape) == (model, cut, shape)


@pytest.mark.parametrize("model", IMAGE_MODELS)  # minilm: tests/exporter/test_minilm.py
def test_split_forward_equals_unsplit_forward_for_every_cut(model: str) -> None:
    shape = (3, 32, 32) if model == "resnet18" else (1, 28, 28)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    splits = [build_split(model, shape, NUM_CLASSES, cut=c, seed=5) for c in MODELS[model]]
    first = splits[0]
    unsplit = nn.Sequential(*first.client.children(), *first.server.children())
    with torch.no_grad():
        reference = unsplit(x)
        for split in splits:
            torch.testing.assert_close(full_forward(split, x), reference)


@pytest.mark.parametrize("model", IMAGE_MODELS)  # minilm: tests/exporter/test_minilm.py
def test_same_seed_same_weights_other_seed_other_weights(model: str) -> None:
    shape = (3, 32, 32) if model == "resnet18" else (1, 8, 8)
    a = _state(build_split(model, shape, NUM_CLASSES, seed=3))
    b = _state(build_split(model, shape, NUM_CLASSES, seed=3))
    c = _state(build_split(model, shape, NUM_CLASSES, seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_build_split_leaves_global_rng_untouched() -> None:
    before = torch.get_rng_state()
    build_split("cnn", (1, 8, 8), NUM_CLASSES, seed=9)
    assert torch.equal(torch.get_rng_state(), before)


def test_default_cuts_are_allowed_cuts() -> None:
    assert DEFAULT_CUTS.keys() == MODELS.keys()
    assert all(DEFAULT_CUTS[m] in MODELS[m] for m in MODELS)
    assert build_split("resnet18", (3, 32, 32), NUM_CLASSES).cut == "layer1"
    assert build_split("cnn", (1, 8, 8), NUM_CLASSES).cut == "conv1"
    assert build_split("fedcnn", (1, 28, 28), NUM_CLASSES).cut == "conv1"


def test_fedcnn_is_the_fedavg_papers_cnn() -> None:
    """McMahan et al. 2017 give 1,663,370 weights for MNIST; the device holds conv1 (and
    conv2 at the conv2 cut: about 52k weights) plus the gap+fc aux head."""
    sizes = {}
    for cut in MODELS["fedcnn"]:
        split = build_split("fedcnn", (1, 28, 28), NUM_CLASSES, cut=cut)
        client, aux, server = (sum(p.numel() for p in m.parameters())
                               for m in (split.client, split.aux, split.server))
        assert client + server == 1_663_370
        sizes[cut] = (client, aux)
    assert sizes == {"conv1": (832, 32 * 10 + 10), "conv2": (832 + 51_264, 64 * 10 + 10)}
    convs = [m for m in split.client.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert sum(isinstance(m, nn.MaxPool2d) for m in split.client.modules()) == 2
    linears = [m for m in split.server.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3136, 512), (512, 10)]


@pytest.mark.parametrize(("shape", "dtype", "model"), [
    ((1, 28, 28), "float32", "fedcnn"),  # MNIST-format: the FedAvg CNN
    ((1, 8, 8), "float32", "cnn"),  # sklearn digits
    ((3, 32, 32), "float32", "cnn"),
    ((3, 28, 28), "float32", "cnn"),
    ((2, 64), "int64", "minilm"),
])
def test_default_model_follows_the_input(shape: tuple[int, ...], dtype: str, model: str) -> None:
    assert default_model(shape, dtype) == model


def test_resnet18_uses_group_norm_and_has_resnet18_size() -> None:
    split = build_split("resnet18", (3, 32, 32), NUM_CLASSES)
    modules = [*split.client.modules(), *split.server.modules()]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert any(isinstance(m, nn.GroupNorm) for m in modules)
    assert not list(split.client.buffers()) and not list(split.server.buffers())
    n = sum(p.numel() for m in (split.client, split.server) for p in m.parameters())
    assert n == 11_173_962  # CIFAR ResNet-18, 10 classes (GroupNorm has BN's affine count)


def test_aux_head_is_pool_and_one_linear() -> None:
    split = build_split("resnet18", (3, 32, 32), NUM_CLASSES, cut="layer2")
    linears = [m for m in split.aux.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    assert (linears[0].in_features, linears[0].out_features) == (128, NUM_CLASSES)


def test_unknown_model_raises_with_choices() -> None:
    with pytest.raises(ValueError, match="cnn.*resnet18"):
        build_split("vgg", (3, 32, 32), NUM_CLASSES)


def test_unknown_cut_raises_with_choices() -> None:
    with pytest.raises(ValueError, match="stem.*layer1.*layer2"):
        build_split("resnet18", (3, 32, 32), NUM_CLASSES, cut="layer4")


@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 8), (0, 8, 8)])
def test_bad_input_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="input"):
        build_split("cnn", shape, NUM_CLASSES)  # type: ignore[arg-type]
