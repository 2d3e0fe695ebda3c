"""The tail-gradient graph: ONNX Runtime, without torch, returns torch autograd's loss and
gradients for the last device layer's ffn_out + ffn_norm (exporter/tail_grad.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.export import train_graph
from exporter.tail_grad import GRAD_PREFIX, TailGradError, export_tail_grad, tail_names
from exporter.zoo import build_split

L = 8
BATCH = 3
NUM_CLASSES = 3
# The child imports only ONNX Runtime and numpy, as a device does, and says whether torch
# got loaded anyway.
_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort
    graph, inputs, out = sys.argv[1:]
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    feed = dict(np.load(inputs))
    names = [o.name for o in session.get_outputs()]
    np.savez(out, **dict(zip(names, session.run(None, feed))))
    print("torch" in sys.modules)
""")


@pytest.mark.slow  # one make_fx trace and one export of real MiniLM (~1 min)
def test_ort_gradients_equal_torch_autograd_without_torch(tmp_path: Path) -> None:
    split = build_split("minilm", (2, L), NUM_CLASSES, cut="layer1", seed=0)
    graph_path = export_tail_grad(split, tmp_path / "tail.onnx", batch=BATCH)
    names = tail_names(split)
    assert names == ["client.layers.0.ffn_out.weight", "client.layers.0.ffn_out.bias",
                     "client.layers.0.ffn_norm.weight", "client.layers.0.ffn_norm.bias"]

    proto = onnx.load(str(graph_path), load_external_data=False)
    assert [i.name for i in proto.graph.input] == ["x", "y", *names]
    assert [o.name for o in proto.graph.output] == ["loss", "smashed",
                                                *(GRAD_PREFIX + n for n in names)]
    assert {n.domain for n in proto.graph.node} <= {""}  # standard ONNX ops only

    # Tail values away from the pretrained ones, and a padded sequence, so the gradient is
    # not a special case; the graph must take the tail from its inputs, not from constants.
    gen = torch.Generator().manual_seed(1)
    graph = train_graph(split)
    params = dict(graph.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(0.05 * torch.randn(params[n].shape, generator=gen))
    x = torch.zeros(BATCH, 2, L, dtype=torch.long)
    x[:, 0] = torch.randint(1000, 30000, (BATCH, L), generator=gen)
    x[:, 1] = 1
    x[0, 1, 5:] = 0
    y = torch.tensor([0, 2, 1])

    for p in graph.parameters():  # reference: plain autograd on the device's training graph
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    loss, smashed, _ = graph(x, y)
    loss.backward()
    ref = {"loss": loss.detach().numpy(), "smashed": smashed.detach().numpy(),
           **{GRAD_PREFIX + n: params[n].grad.numpy() for n in names}}

    np.savez(tmp_path / "in.npz", x=x.numpy(), y=y.numpy(),
             **{n: params[n].detach().numpy() for n in names})
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(graph_path), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "False", "the graph's runner loaded torch"
    got = dict(np.load(tmp_path / "out.npz"))
    assert set(got) == set(ref)
    for key, want in ref.items():
        # float32, different summation orders: the longest reduction on the way is the
        # 1536-wide ffn product, whose worst-case rounding is 1536 * 2**-24 ~ 1e-4 of its
        # terms' size; 2e-4 of the largest entry bounds it (observed ~1e-6).
        tol = 2e-4 * float(np.abs(want).max())
        assert np.abs(got[key] - want).max() <= tol, key
        assert np.abs(want).max() > 0, key  # a zero gradient would pass trivially


@pytest.mark.slow  # builds real MiniLM
def test_unknown_tail_set_and_models_without_layers_are_refused(tmp_path: Path) -> None:
    split = build_split("minilm", (2, L), NUM_CLASSES, cut="layer1", seed=0)
    with pytest.raises(TailGradError, match="unknown tail set"):
        tail_names(split, "lora-all")
    with pytest.raises(TailGradError, match="no convolution"):
        tail_names(split, "last-conv")
    cnn = build_split("cnn", (1, 8, 8), 10)
    with pytest.raises(TailGradError, match="no encoder layers"):
        tail_names(cnn, "ffnout-last1")
