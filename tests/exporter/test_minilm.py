"""MiniLM split: pretrained weights, LoRA trainables, and ONNX Runtime vs torch parity."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from edge_runtime.bundle import (
    GRAPH_DATA,
    Bundle,
    bundle_from_files,
    load_bundle,
    read_bundle_files,
    store_bundle_files,
)
from edge_runtime.manifest import LOGITS_OUTPUT, BundleError
from edge_runtime.runtime import LocalModel, open_session
from exporter.export import (
    aux_from_server,
    export_bundle,
    flat_from_split,
    load_flat_into,
    train_graph,
)
from exporter.minilm import HIDDEN, MiniLMError, sentence_embedding
from exporter.zoo import MODELS, SplitModel, build_split, full_forward
from heron_data.text import minilm_dir, tokenize

L = 24
NUM_CLASSES = 3
RANK = 8
LORA_PER_LAYER = 2 * (RANK * HIDDEN + HIDDEN * RANK)  # query and value, A and B each
CLASSIFIER = HIDDEN * NUM_CLASSES + NUM_CLASSES


@dataclass
class Exported:
    split: SplitModel
    bundle: Bundle
    session: ort.InferenceSession


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    split = build_split("minilm", (2, L), NUM_CLASSES, seed=0)  # cut layer3
    out = tmp_path_factory.mktemp("minilm")
    export_bundle(split, out)
    bundle = load_bundle(out)
    session = open_session(bundle)
    return Exported(split, bundle, session)


def _tokens(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids with random lengths: [CLS] ids... [SEP] then padding."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 2, L), dtype=np.int64)
    for i in range(n):
        length = int(rng.integers(3, L + 1))
        x[i, 0, :length] = rng.integers(1000, 30000, size=length)
        x[i, 0, 0], x[i, 0, length - 1] = 101, 102
        x[i, 1, :length] = 1
    return x, rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)


def _perturbed(flat: np.ndarray, seed: int, scale: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (flat + scale * rng.standard_normal(flat.shape)).astype(np.float32)


def _torch_outputs(split: SplitModel, x: np.ndarray,
                   y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    with torch.no_grad():
        loss, smashed, logits = train_graph(split)(torch.from_numpy(x), torch.from_numpy(y))
    return float(loss), smashed.numpy(), logits.numpy()


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_matches_torch_with_fed_nonzero_lora_weights(exported: Exported, batch: int) -> None:
    split, bundle, session = exported.split, exported.bundle, exported.session
    x, y = _tokens(batch, seed=batch)
    previous = None
    for seed in (1, 2):  # two different weight vectors: the graph must use what is fed
        theta = _perturbed(bundle.weights, seed)
        load_flat_into(split, bundle.manifest, theta)
        loss, smashed, logits = session.run(
            ["loss", "smashed", "logits"], {"x": x, "y": y, **bundle.unflatten(theta)})
        t_loss, t_smashed, t_logits = _torch_outputs(split, x, y)
        assert smashed.shape == (batch, L, HIDDEN + 1)
        np.testing.assert_allclose(smashed, t_smashed, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits, t_logits, rtol=1e-4, atol=1e-4)
        assert math.isclose(float(loss), t_loss, rel_tol=1e-4, abs_tol=1e-5)
        np.testing.assert_array_equal(smashed[..., HIDDEN], x[:, 1])  # the mask rides along
        if previous is not None:
            assert np.abs(logits - previous).max() > 1e-3
        previous = logits
    load_flat_into(split, bundle.manifest, bundle.weights)  # leave the shared split as built


def test_zero_lora_b_means_the_pretrained_function(exported: Exported) -> None:
    """LoRA B starts at zero: perturbing only the A matrices changes nothing."""
    bundle, session = exported.bundle, exported.session
    x, y = _tokens(3, seed=7)
    theta = bundle.weights.copy()
    feeds = bundle.unflatten(theta)
    base = session.run(["smashed"], {"x": x, "y": y, **feeds})[0]
    for name, value in feeds.items():
        if name.endswith("lora_A"):
            value += 1.0
    np.testing.assert_array_equal(session.run(["smashed"], {"x": x, "y": y, **feeds})[0], base)


def test_graph_inputs_are_x_y_and_exactly_the_lora_and_aux_classifier(exported: Exported) -> None:
    m = exported.bundle.manifest
    names = [i.name for i in exported.session.get_inputs()]
    assert names == ["x", "y", *(p.name for p in m.params)]
    assert exported.session.get_inputs()[0].type == "tensor(int64)"
    assert m.input_dtype == "int64" and m.input_shape == (2, L)
    assert m.smashed_shape == (L, HIDDEN + 1)
    client = [p.name for p in m.params if p.role == "client"]
    aux = [p.name for p in m.params if p.role == "aux"]
    assert all(".lora_" in n for n in client)
    assert sum(p.size for p in m.params if p.role == "client") == 3 * LORA_PER_LAYER
    assert sum(p.size for p in m.params if p.role == "aux") == LORA_PER_LAYER + CLASSIFIER
    assert m.num_params == 4 * LORA_PER_LAYER + CLASSIFIER
    assert {n for n in aux if ".lora_" not in n} == {"aux.classifier.weight",
                                                     "aux.classifier.bias"}
    assert m.extra["options"] == {"lora_rank": 8, "lora_alpha": 16.0, "server_train": "lora"}


def test_frozen_weights_are_initializers(exported: Exported) -> None:
    import onnx

    proto = onnx.load_from_string(exported.bundle.graph)
    inits = {i.name for i in proto.graph.initializer}
    frozen = {f"client.{n}" for n, p in exported.split.client.named_parameters()
              if not p.requires_grad} | {f"aux.{n}" for n, p in
                                         exported.split.aux.named_parameters()
                                         if not p.requires_grad}
    assert "client.embeddings.word.weight" in frozen and "aux.layers.0.key.weight" in frozen
    assert frozen <= inits
    assert not inits & {p.name for p in exported.bundle.manifest.params}


def test_frozen_tensors_live_in_page_aligned_external_data(exported: Exported) -> None:
    """The 47 MB embedding table and the other frozen weights are ONNX external data that
    ONNX Runtime maps from the bundle directory; the graph file itself stays small."""
    import onnx
    from onnx import TensorProto

    root = exported.bundle.root
    assert root is not None and exported.bundle.external_data == root / GRAPH_DATA
    assert len(exported.bundle.graph) < 1 << 20
    assert (root / GRAPH_DATA).stat().st_size > 40 << 20
    proto = onnx.load_from_string(exported.bundle.graph)
    word = next(t for t in proto.graph.initializer if t.name == "client.embeddings.word.weight")
    assert word.data_location == TensorProto.EXTERNAL
    info = {e.key: e.value for e in word.external_data}
    assert info["location"] == GRAPH_DATA and int(info["offset"]) % 4096 == 0
    # the mapped table is the exported one: a token's embedding row, read back from the file
    raw = np.memmap(root / GRAPH_DATA, dtype="<f4", mode="r", offset=int(info["offset"]),
                    shape=tuple(word.dims))
    table = exported.split.client.embeddings.word.weight.detach().numpy()
    assert np.array_equal(raw[[101, 2023, 102]], table[[101, 2023, 102]])


def test_external_data_is_verified_and_stored_for_devices(exported: Exported,
                                                          tmp_path: Path) -> None:
    root = exported.bundle.root
    assert root is not None
    files = read_bundle_files(root)  # what the server ships over MQTT
    in_memory = bundle_from_files(files)
    with pytest.raises(BundleError, match="store_bundle_files"):
        open_session(in_memory)
    # a device stores what it received, then maps it from there: same function
    stored = store_bundle_files(files, tmp_path / "cache")
    assert store_bundle_files(files, tmp_path / "cache") == stored  # reused, not rewritten
    x, y = _tokens(3, seed=5)
    theta = exported.bundle.weights
    got = LocalModel(load_bundle(stored), threads=1).loss(theta, x, y)
    assert got == pytest.approx(LocalModel(exported.bundle, threads=1).loss(theta, x, y),
                                abs=1e-6)
    # one flipped byte in the mapped data is caught at load, with a hint
    data = bytearray((stored / GRAPH_DATA).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (stored / GRAPH_DATA).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"train\.onnx\.data sha256 .*re-export"):
        load_bundle(stored)
    assert store_bundle_files(files, tmp_path / "cache") == stored  # replaced, now whole
    load_bundle(stored)
    (stored / GRAPH_DATA).unlink()
    with pytest.raises(BundleError, match="missing train.onnx.data"):
        load_bundle(stored)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(BundleError, match="cannot store the bundle.*--bundle-cache"):
        store_bundle_files(files, not_a_dir / "cache")
    files.pop(GRAPH_DATA)
    with pytest.raises(BundleError, match="missing train.onnx.data"):
        bundle_from_files(files)


def test_segment_chain_for_block_wise_zo_reproduces_the_training_graph(
        exported: Exported) -> None:
    """One segment per client layer (the first also embeds) plus the aux head: chained at
    perturbed weights they give the graph's loss and smashed data; their frozen tensors
    point into the same mapped data file, so the chain adds no copy of the weights."""
    import onnx
    from onnx import TensorProto

    m = exported.bundle.manifest
    assert [s.name for s in m.segments] == ["layers.0", "layers.1", "layers.2", "aux"]
    assert [s.size for s in m.segments] == [12_288] * 3 + [12_288 + 385 * NUM_CLASSES]
    root = exported.bundle.root
    assert root is not None
    for spec in m.segments:
        assert (root / spec.file).stat().st_size < 64 << 10
        proto = onnx.load_from_string((root / spec.file).read_bytes())
        big = [t for t in proto.graph.initializer if math.prod(t.dims) * 4 >= 1024]
        assert big and all(t.data_location == TensorProto.EXTERNAL for t in big)
    model = LocalModel(exported.bundle, threads=1)
    chain = model.chain()
    x, y = _tokens(5, seed=11)
    rng = np.random.default_rng(2)
    theta = exported.bundle.weights + 0.02 * rng.standard_normal(m.num_params).astype(np.float32)
    loss, smashed = model.run(theta, x, y, ("loss", "smashed"))
    acts = chain.prefix(theta, x, len(chain) - 1)
    np.testing.assert_allclose(acts[len(chain) - 1], smashed, rtol=1e-5, atol=1e-5)
    for j in range(len(chain)):
        assert chain.loss_from(j, acts[j], theta, y) == pytest.approx(float(loss), abs=1e-5)


def test_local_model_runs_int64_shards(exported: Exported) -> None:
    model = LocalModel(exported.bundle, threads=1)
    x, y = _tokens(4, seed=3)
    model.check_data(x, y)
    loss = model.loss(exported.bundle.weights, x, y)
    assert math.isfinite(loss) and loss > 0


def test_server_takes_smashed_data_and_trains_what_the_mode_says() -> None:
    for mode, trainable in (("lora", 3 * LORA_PER_LAYER + CLASSIFIER), ("full", None)):
        split = build_split("minilm", (2, L), NUM_CLASSES, server_train=mode)
        x, _ = _tokens(2, seed=0)
        with torch.no_grad():
            logits = split.server(split.client(torch.from_numpy(x)))
        assert logits.shape == (2, NUM_CLASSES)
        count = sum(p.numel() for p in split.server.parameters() if p.requires_grad)
        total = sum(p.numel() for p in split.server.parameters())
        assert count == (trainable if trainable is not None else total)
        assert not any(p.requires_grad for n, p in split.client.named_parameters()
                       if "lora_" not in n)
        aux_trainable = sum(p.numel() for p in split.aux.parameters() if p.requires_grad)
        assert aux_trainable == LORA_PER_LAYER + CLASSIFIER


def test_aux_layer_starts_as_a_copy_of_the_first_server_layer() -> None:
    split = build_split("minilm", (2, L), NUM_CLASSES, cut="layer2")
    aux, first = split.aux.layers[0], split.server.layers[0]
    for name, value in first.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(aux.state_dict()[name], value)
            assert aux.state_dict()[name].data_ptr() != value.data_ptr()  # a copy, not shared


def test_same_seed_same_function_for_every_cut_and_seeds_fix_lora() -> None:
    x = torch.from_numpy(_tokens(2, seed=4)[0][:, :, :8])
    outs = []
    for cut in MODELS["minilm"]:
        split = build_split("minilm", (2, 8), NUM_CLASSES, cut=cut, seed=5)
        with torch.no_grad():
            outs.append(full_forward(split, x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])
    a, b, c = (_trainables(build_split("minilm", (2, 8), NUM_CLASSES, seed=s))
               for s in (5, 5, 6))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a if "lora_B" not in k)  # B starts at 0


def _trainables(split: SplitModel) -> dict[str, torch.Tensor]:
    parts = {"client": split.client, "aux": split.aux, "server": split.server}
    return {f"{k}.{n}": p.detach() for k, m in parts.items() for n, p in m.named_parameters()
            if p.requires_grad}


def test_bad_options_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="lora_rnak"):
        build_split("minilm", (2, L), 2, lora_rnak=4)
    with pytest.raises(MiniLMError, match="server_train"):
        build_split("minilm", (2, L), 2, server_train="all")
    with pytest.raises(MiniLMError, match="lora_rank"):
        build_split("minilm", (2, L), 2, lora_rank=0)
    with pytest.raises(ValueError, match=r"\(2, L\)"):
        build_split("minilm", (3, 32, 32), 2)
    with pytest.raises(ValueError, match="takes no option"):
        build_split("cnn", (1, 8, 8), 2, lora_rank=4)


def test_lora_rank_option_sets_the_device_dimension(tmp_path: Path) -> None:
    split = build_split("minilm", (2, 8), 2, cut="layer1", lora_rank=2)
    n = sum(p.numel() for m in (split.client, split.aux) for p in m.parameters()
            if p.requires_grad)
    assert n == 2 * (2 * (2 * HIDDEN * 2)) + HIDDEN * 2 + 2


# --- pretrained weights: an independent numpy BERT and the paraphrase property --------------

def _np_sentence_embedding(x: np.ndarray) -> np.ndarray:
    """all-MiniLM-L6-v2 straight from the safetensors file, in numpy (checkpoint names)."""
    erf = np.vectorize(math.erf)
    with safe_open(str(minilm_dir() / "model.safetensors"), framework="np") as f:
        w = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}

    def ln(h: np.ndarray, p: str) -> np.ndarray:
        mu = h.mean(-1, keepdims=True)
        var = h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-12) * w[f"{p}.weight"] + w[f"{p}.bias"]

    def lin(h: np.ndarray, p: str) -> np.ndarray:
        return h @ w[f"{p}.weight"].T + w[f"{p}.bias"]

    ids, mask = x[:, 0], x[:, 1].astype(np.float64)
    n = ids.shape[1]
    h = ln(w["embeddings.word_embeddings.weight"][ids]
           + w["embeddings.position_embeddings.weight"][:n]
           + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    bias = (1.0 - mask)[:, None, None, :] * -1e30
    for i in range(6):
        p = f"encoder.layer.{i}"

        def split_heads(t: np.ndarray) -> np.ndarray:
            return t.reshape(t.shape[0], n, 12, 32).transpose(0, 2, 1, 3)

        q = split_heads(lin(h, f"{p}.attention.self.query"))
        k = split_heads(lin(h, f"{p}.attention.self.key"))
        v = split_heads(lin(h, f"{p}.attention.self.value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(32) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(h.shape)
        h = ln(h + lin(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        inner = lin(h, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / np.sqrt(2.0)))
        h = ln(h + lin(inner, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


SENTENCES = ["a great movie", "an excellent film", "the train to the airport leaves at noon",
             "it 's a charming and often affecting journey ."]


def test_pretrained_weights_match_an_independent_numpy_bert() -> None:
    x = tokenize(SENTENCES, 16)
    split = build_split("minilm", (2, 16), 2, cut="layer3")
    with torch.no_grad():
        ours = sentence_embedding(split.client, split.server, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, _np_sentence_embedding(x), atol=2e-5)


def test_paraphrases_embed_closer_than_unrelated_sentences() -> None:
    x = torch.from_numpy(tokenize(SENTENCES, 16))
    split = build_split("minilm", (2, 16), 2, cut="layer1")
    with torch.no_grad():
        e = sentence_embedding(split.client, split.server, x)
    sim = e @ e.T
    assert sim[0, 1] > 0.7  # all-MiniLM-L6-v2 gives 0.86
    assert sim[0, 1] > sim[0, 2] + 0.5 and sim[1, 0] > sim[1, 2] + 0.5


def test_config_mismatch_is_refused(tmp_path: Path) -> None:
    real = minilm_dir()
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(real / name)
    config = json.loads((real / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 12}))
    with pytest.raises(MiniLMError, match="another model"):
        build_split("minilm", (2, 8), 2, model_dir=tmp_path)


def test_flat_round_trip(exported: Exported) -> None:
    flat = flat_from_split(exported.split, exported.bundle.manifest)
    np.testing.assert_array_equal(flat, exported.bundle.weights)


def test_aux_from_server_makes_the_aux_head_the_server_at_the_last_cut(tmp_path: Path) -> None:
    """At cut layer5 the server is one layer + classifier, built like the aux: after the
    copy, the device's local loss head computes exactly the server's function (the
    reference), on the ONNX side too, even after the server has trained."""
    split = build_split("minilm", (2, L), NUM_CLASSES, cut="layer5", seed=1)
    manifest = export_bundle(split, tmp_path / "b")
    with torch.no_grad():  # as if trained: non-zero server adapters and classifier
        for p in split.server.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    before = flat_from_split(split, manifest)
    flat, copied = aux_from_server(split.server, manifest, before)
    assert copied == [p.name for p in manifest.params if p.role == "aux"]
    client = [p for p in manifest.params if p.role == "client"]
    n_client = sum(p.size for p in client)
    np.testing.assert_array_equal(flat[:n_client], before[:n_client])  # θ_c untouched
    load_flat_into(split, manifest, flat)
    x, y = _tokens(3, seed=2)
    with torch.no_grad():
        smashed = split.client(torch.from_numpy(x))
        torch.testing.assert_close(split.aux(smashed), split.server(smashed), rtol=0, atol=0)
    (logits,) = LocalModel(load_bundle(tmp_path / "b")).run(flat, x, y, (LOGITS_OUTPUT,))
    with torch.no_grad():
        np.testing.assert_allclose(logits, split.server(smashed).numpy(), atol=1e-4)


def test_aux_from_server_copies_what_matches_and_nothing_for_a_cnn(tmp_path: Path) -> None:
    split = build_split("minilm", (2, L), NUM_CLASSES, cut="layer2", server_train="full")
    manifest = export_bundle(split, tmp_path / "m")
    flat, copied = aux_from_server(split.server, manifest, flat_from_split(split, manifest))
    assert copied == ["aux.classifier.weight", "aux.classifier.bias"]  # server has no LoRA
    cnn = build_split("cnn", (1, 8, 8), 10)
    cnn_manifest = export_bundle(cnn, tmp_path / "c")
    flat = flat_from_split(cnn, cnn_manifest)
    same, copied = aux_from_server(cnn.server, cnn_manifest, flat)
    assert copied == [] and np.array_equal(same, flat)
