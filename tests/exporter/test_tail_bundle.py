"""heron-tail's bundle graph on the small CNNs: ONNX Runtime returns torch autograd's aux
loss, smashed data and gradients for the last device conv + aux head, with every trainable
tensor of the bundle an input (exporter/tail_grad.py, exporter/export.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_runtime.bundle import TAIL_GRAPH, load_bundle
from edge_runtime.manifest import GRAD_PREFIX
from exporter.export import export_bundle, train_graph, trainable_params
from exporter.tail_grad import (
    TailGradError,
    bundle_tail_graph,
    mark_tail_trainable,
    tail_names,
    trained_names,
)
from exporter.zoo import build_split

BATCH = 5


@pytest.mark.parametrize(("model", "shape", "cut", "tail"), [
    ("cnn", (1, 8, 8), "conv2", ["client.conv2.0.weight", "client.conv2.0.bias"]),
    ("cnn", (1, 8, 8), "conv1", ["client.conv1.0.weight", "client.conv1.0.bias"]),
    ("fedcnn", (1, 28, 28), "conv2", ["client.conv2.0.weight", "client.conv2.0.bias"]),
    # a conv without bias, then GroupNorm and ReLU on the way to the cut
    ("resnet18", (3, 16, 16), "stem", ["client.stem.0.weight"]),
])
def test_bundle_tail_gradients_equal_torch_autograd(tmp_path: Path, model: str,
                                                    shape: tuple[int, ...], cut: str,
                                                    tail: list[str]) -> None:
    split = build_split(model, shape, 10, cut=cut, seed=0)
    assert tail_names(split) == tail
    mark_tail_trainable(split)
    manifest = export_bundle(split, tmp_path / "b", tail_batch=BATCH)
    names = [p.name for p in manifest.params]
    trained = [*tail, "aux.fc.weight", "aux.fc.bias"]
    assert manifest.tail is not None and list(manifest.tail.trained) == trained
    assert manifest.tail.batch == BATCH and manifest.tail.file == TAIL_GRAPH
    assert manifest.segments == ()  # a tail bundle runs no block-wise ZO
    bundle = load_bundle(tmp_path / "b")
    assert bundle.tail is not None

    # Weights away from the exported ones (the graph must read them from its inputs), a
    # batch of random images and labels.
    gen = torch.Generator().manual_seed(3)
    graph = train_graph(split)
    params = dict(graph.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(0.05 * torch.randn(params[n].shape, generator=gen))
    x = torch.randn(BATCH, *shape, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    for p in graph.parameters():
        p.requires_grad_(False)
    for n in trained:
        params[n].requires_grad_(True)
    loss, smashed, _ = graph(x, y)
    loss.backward()
    ref = {"loss": loss.detach().numpy(), "smashed": smashed.detach().numpy(),
           **{GRAD_PREFIX + n: params[n].grad.numpy() for n in trained}}

    session = ort.InferenceSession(bundle.tail, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "y", *names]
    feed = {"x": x.numpy(), "y": y.numpy(),
            **{n: params[n].detach().numpy() for n in names}}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed),
                   strict=True))
    assert set(got) == set(ref)
    for key, want in ref.items():
        # float32 with different summation orders: the longest reduction is the conv weight
        # gradient's, over batch x height x width (5 x 28 x 28 = 3,920 terms on fedcnn), whose
        # worst-case rounding is 3920 * 2**-24 ~ 2.3e-4 of its terms' size; 1e-3 of the
        # largest entry bounds it with room for cancellation (observed ~1e-6).
        tol = 1e-3 * float(np.abs(want).max())
        assert np.abs(got[key] - want).max() <= tol, key
        assert np.abs(want).max() > 0, key  # a zero gradient would pass trivially


def test_the_tail_must_be_trainable_before_the_bundle_graph_is_made() -> None:
    split = build_split("cnn", (1, 8, 8), 10, cut="conv2", seed=0)
    for p in split.client.parameters():  # as minilm's base weights are
        p.requires_grad_(False)
    with pytest.raises(TailGradError, match="mark_tail_trainable"):
        bundle_tail_graph(split, batch=2)
    mark_tail_trainable(split)
    assert trained_names(split) == [n for n, _, _ in trainable_params(train_graph(split))]
