"""A hostile or impersonated server against the device: bundles whose graphs ask ONNX Runtime
for files outside the bundle (traversal, absolute, other relative names, symlinks, ranges past
the data file), tampered files, bundles larger than the device can hold, and messages for
another run. Each is refused with a clear error before any ONNX Runtime session exists, and
nothing outside the bundle's folder is read (a planted secret never shows up in a session's
output or in anything the device sends) or written (only the bundle cache's own folder).

Graphs are real ONNX (onnx.helper) run by real ONNX Runtime sessions; the device is the real
`Device` with its real transport's reassembler and codec, publishing into a list instead of
a broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, heron
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from paho.mqtt.client import topic_matches_sub

import edge_runtime.bundle as bundle_mod
from devices.mosquitto import SERVER_USER, acl_text
from edge_runtime import external_data
from edge_runtime.bundle import (
    GRAPH,
    GRAPH_DATA,
    MANIFEST,
    WEIGHTS,
    bundle_from_files,
    check_external_data,
    load_bundle,
    read_bundle_files,
    sha256_bytes,
    store_bundle_files,
    write_bundle,
)
from edge_runtime.device import Device, DeviceExit, DeviceOptions, message_limit, server_kinds
from edge_runtime.external_data import external_refs
from edge_runtime.manifest import BundleError, SegmentGraphs
from edge_runtime.profiles import Profile
from edge_runtime.protocol import (
    MAX_CHUNK_PAYLOAD,
    MAX_MESSAGE_BYTES,
    BundleFiles,
    CodecError,
    Gradient,
    Join,
    Message,
    Presence,
    Reassembler,
    RoundStart,
    Stop,
    chunk,
    encode,
    new_msg_id,
    topics,
)
from edge_runtime.runtime import LocalModel
from edge_runtime.transport import MqttTransport
from exporter.export import export_split

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
C = np.array([0.5, -0.5, 1.0, 2.0], dtype="<f4")  # the frozen tensor, in train.onnx.data
SECRET = np.full(4, 1234.5, dtype="<f4")  # what a planted secret file holds
SECRET_BYTES = SECRET.tobytes()
DEV = "dev-0"
P = topics.DEFAULT_PREFIX


# -- graphs ---------------------------------------------------------------------------------
def external(name: str, location: str | None, offset: int | str = 0, length: int | str = 16,
             extra: tuple[tuple[str, str], ...] = ()) -> TensorProto:
    """A float32 [4] tensor whose bytes ONNX Runtime would read from `location`."""
    t = TensorProto()
    t.name, t.data_type = name, FLOAT
    t.dims.extend([4])
    t.data_location = TensorProto.EXTERNAL
    entries = ([("location", location)] if location is not None else []) + [
        ("offset", str(offset)), ("length", str(length)), *extra]
    for key, value in entries:
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def _io() -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["N", 4]),
              helper.make_tensor_value_info("y", INT64, ["N"]),
              helper.make_tensor_value_info("w", FLOAT, [4, 2])]
    outputs = [helper.make_tensor_value_info("loss", FLOAT, []),
               helper.make_tensor_value_info("smashed", FLOAT, ["N", 4]),
               helper.make_tensor_value_info("logits", FLOAT, ["N", 2])]
    return inputs, outputs


HEAD = [helper.make_node("Add", ["x", "c"], ["smashed"]),
        helper.make_node("MatMul", ["smashed", "w"], ["logits"]),
        helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "y"], ["loss"])]


def train_graph(c: TensorProto, place: str = "initializer") -> bytes:
    """The training graph (smashed = x + c, logits = smashed @ w, loss) with the frozen
    tensor c in one of the places an ONNX model can hold a tensor."""
    inputs, outputs = _io()
    nodes, inits, sparse = list(HEAD), [], []
    functions, training = [], []
    opsets = [helper.make_opsetid("", 17)]
    if place == "initializer":
        inits = [c]
    elif place == "constant":  # a node attribute (t)
        nodes.insert(0, helper.make_node("Constant", [], ["c"], value=c))
    elif place == "subgraph":  # a tensor inside an If branch's graph
        def branch(t: TensorProto, name: str) -> onnx.GraphProto:
            return helper.make_graph([helper.make_node("Constant", [], [name], value=t)],
                                     name, [], [helper.make_tensor_value_info(name, FLOAT, [4])])
        inits = [helper.make_tensor("cond", TensorProto.BOOL, [], [True])]
        plain = helper.make_tensor("c_else", FLOAT, [4], C.tolist())
        nodes.insert(0, helper.make_node("If", ["cond"], ["c"], then_branch=branch(c, "c_then"),
                                         else_branch=branch(plain, "c_else")))
    elif place == "sparse":  # a sparse initializer's values
        indices = helper.make_tensor("c_idx", INT64, [4], [0, 1, 2, 3])
        c.name = "c_values"
        sparse = [helper.make_sparse_tensor(c, indices, [4])]
        sparse[0].values.name = "c"
    elif place == "function":  # a model-local function's Constant
        opsets.append(helper.make_opsetid("local", 1))
        functions = [helper.make_function("local", "frozen", [], ["out"],
                                          [helper.make_node("Constant", [], ["out"], value=c)],
                                          [helper.make_opsetid("", 17)])]
        nodes.insert(0, helper.make_node("frozen", [], ["c"], domain="local"))
    elif place == "training":  # a training-info graph; the model itself holds c inline
        inits = [helper.make_tensor("c", FLOAT, [4], C.tolist())]
        info = onnx.TrainingInfoProto()
        info.initialization.CopyFrom(helper.make_graph([], "init", [], [], [c]))
        training = [info]
    else:
        raise AssertionError(place)
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits, sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.training_info.extend(training)
    model.ir_version = 8
    return model.SerializeToString()


def segment_graphs(c: TensorProto) -> list[SegmentGraphs]:
    """The same computation as a chain: segment 0 adds c, segment 1 is head and loss."""
    seg0 = helper.make_graph([helper.make_node("Add", ["input", "c"], ["output"])], "add",
                             [helper.make_tensor_value_info("input", FLOAT, ["N", 4])],
                             [helper.make_tensor_value_info("output", FLOAT, ["N", 4])], [c])
    seg1 = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"]),
         helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "y"], ["loss"])], "aux",
        [helper.make_tensor_value_info("input", FLOAT, ["N", 4]),
         helper.make_tensor_value_info("y", INT64, ["N"]),
         helper.make_tensor_value_info("w", FLOAT, [4, 2])],
        [helper.make_tensor_value_info("loss", FLOAT, [])])

    def model(g: onnx.GraphProto) -> bytes:
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m.SerializeToString()
    return [SegmentGraphs("add", model(seg0), 0), SegmentGraphs("aux", model(seg1), 1)]


W = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)


def write(out: Path, graph: bytes, *, data: bytes | None = C.tobytes(),
          segments: list[SegmentGraphs] | None = None) -> Path:
    write_bundle(out, onnx_bytes=graph, params=[("w", W, "client")], model="tiny", cut="add",
                 input_shape=(4,), num_classes=2, smashed_shape=(4,), opset=17,
                 graph_data=data, segments=segments)
    return out


# -- the scene: a secret beside the bundle and in the working directory ----------------------
@dataclass
class Scene:
    root: Path  # everything the test makes lies below it
    bundle: Path  # root/bundle: where a bundle is written
    work: Path  # root/work: the process's working directory, holding a "secret" too
    secret: Path  # root/secret, beside the bundle folder


@pytest.fixture
def scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scene:
    work = tmp_path / "work"
    work.mkdir()
    for where in (tmp_path / "secret", work / "secret", work / GRAPH_DATA):
        where.write_bytes(SECRET_BYTES)
    monkeypatch.chdir(work)
    return Scene(tmp_path, tmp_path / "bundle", work, tmp_path / "secret")


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ONNX Runtime session made while the test runs."""
    made: list[Any] = []
    real = ort.InferenceSession

    def spy(*args: Any, **kwargs: Any) -> Any:
        made.append(args[0] if args else kwargs.get("path_or_bytes"))
        return real(*args, **kwargs)
    monkeypatch.setattr(ort, "InferenceSession", spy)
    return made


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below `root`: (size, mtime in ns), to see what a step wrote."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def x_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((3, 4)).astype(np.float32), np.array([0, 1, 0], dtype=np.int64)


def smashed_minus_x(model: LocalModel) -> np.ndarray:
    x, y = x_batch()
    smashed = model.run(model.bundle.weights, x, y, ("smashed",))[0]
    return (smashed - x)[0]


# -- the legitimate bundle works, and reads its own data only -----------------------------------
def test_a_bundle_reading_its_own_data_file_loads_and_never_sees_the_secret(
        scene: Scene, sessions: list[Any]) -> None:
    write(scene.bundle, train_graph(external("c", GRAPH_DATA)), segments=segment_graphs(
        external("c", GRAPH_DATA)))
    model = LocalModel(load_bundle(scene.bundle), threads=1)
    np.testing.assert_allclose(smashed_minus_x(model), C, atol=1e-6)
    x, y = x_batch()
    chain = model.chain()  # the segments map the same data file
    assert chain.loss_from(0, x, model.bundle.weights, y) == pytest.approx(
        model.loss(model.bundle.weights, x, y), abs=1e-5)
    assert len(sessions) == 3


# -- hostile external-data locations -------------------------------------------------------------
HOSTILE = ["../secret", "secret", "/etc/passwd", "ABSOLUTE", "./train.onnx.data",
           "train.onnx.data/../../secret", "sub/train.onnx.data", "link", "", "TRAIN.ONNX.DATA",
           "train.onnx.data\x00../secret"]


def location(scene: Scene, name: str) -> str:
    return str(scene.secret) if name == "ABSOLUTE" else name


@pytest.mark.parametrize("hostile", HOSTILE)
def test_a_graph_naming_any_other_file_is_refused_before_any_session(
        scene: Scene, sessions: list[Any], hostile: str) -> None:
    write(scene.bundle, train_graph(external("c", location(scene, hostile))))
    (scene.bundle / "link").symlink_to(scene.secret)
    with pytest.raises(BundleError, match=r"asks for external data from .*only the bundle's "
                                          r"own train\.onnx\.data.*help:"):
        load_bundle(scene.bundle)
    files = read_bundle_files(scene.bundle)
    with pytest.raises(BundleError, match="asks for external data"):
        bundle_from_files(files)
    with pytest.raises(BundleError, match="asks for external data"):
        store_bundle_files(files, scene.root / "cache")
    assert not (scene.root / "cache").exists()  # nothing written before the check
    assert sessions == []


PLACES = ["initializer", "constant", "subgraph", "sparse", "function", "training"]


@pytest.mark.parametrize("place", PLACES)
def test_every_place_a_tensor_can_hide_is_checked(scene: Scene, sessions: list[Any],
                                                  place: str) -> None:
    write(scene.bundle, train_graph(external("c", GRAPH_DATA), place))  # allowed everywhere
    assert load_bundle(scene.bundle).manifest.model == "tiny"
    write(scene.bundle, train_graph(external("c", "../secret"), place))
    with pytest.raises(BundleError, match="asks for external data from '../secret'"):
        load_bundle(scene.bundle)
    assert sessions == []


@pytest.mark.parametrize("which", ["add", "aux"])
def test_a_segment_graph_naming_another_file_is_refused(scene: Scene, sessions: list[Any],
                                                        which: str) -> None:
    segments = segment_graphs(external("c", GRAPH_DATA))
    hostile = segment_graphs(external("c", "../secret"))[0].graph
    if which == "aux":  # the loss segment gets a frozen tensor of its own
        m = onnx.load_from_string(segments[1].graph)
        m.graph.initializer.append(external("extra", "../secret"))
        hostile = m.SerializeToString()
    i = 0 if which == "add" else 1
    segments[i] = segments[i]._replace(graph=hostile)
    write(scene.bundle, train_graph(external("c", GRAPH_DATA)), segments=segments)
    with pytest.raises(BundleError, match=rf"segment{i}\.onnx: tensor .* asks for external "
                                          "data from '../secret'"):
        load_bundle(scene.bundle)
    assert sessions == []


@pytest.mark.parametrize(("offset", "length", "extra", "why"), [
    (2**40, 16, (), r"reads bytes 1099511627776\.\.1099511627792 of train\.onnx\.data, which "
                    r"holds 16"),
    (0, 2**40, (), "reads bytes 0..1099511627776"),
    (8, 16, (), "reads bytes 8..24"),
    (-1, 16, (), "must be decimal byte counts"),
    (0, "0x10", (), "must be decimal byte counts"),
    (0, " 16", (), "must be decimal byte counts"),
    (0, "9" * 30, (), "must be decimal byte counts"),
    (0, 16, (("basepath", "/etc"),), "only one each of location, offset, length, checksum"),
    (0, 16, (("location", "../secret"),), "only one each"),
])
def test_a_range_outside_the_data_file_or_odd_keys_are_refused(
        scene: Scene, sessions: list[Any], offset: Any, length: Any,
        extra: tuple[tuple[str, str], ...], why: str) -> None:
    write(scene.bundle, train_graph(external("c", GRAPH_DATA, offset, length, extra)))
    with pytest.raises(BundleError, match=why):
        load_bundle(scene.bundle)
    assert sessions == []


def test_external_data_is_refused_where_the_bundle_has_no_data_file(
        scene: Scene, sessions: list[Any]) -> None:
    write(scene.bundle, train_graph(external("c", GRAPH_DATA)), data=None)
    (scene.bundle / GRAPH_DATA).write_bytes(C.tobytes())  # present, but not in the manifest
    with pytest.raises(BundleError, match="train.onnx.data, which this bundle's manifest does "
                                          "not list"):
        load_bundle(scene.bundle)
    t = external("c", None)  # EXTERNAL with no location at all
    write(scene.bundle, train_graph(t))
    with pytest.raises(BundleError, match="asks for external data from None"):
        load_bundle(scene.bundle)
    assert sessions == []


def test_graphs_that_are_not_onnx_protobuf_are_refused(scene: Scene) -> None:
    good = train_graph(external("c", GRAPH_DATA))
    for bad, why in ((good[:-3], "not a well-formed ONNX model"),
                     (b"\x00\x00\x00\x00ORTM" + good, "ONNX Runtime's own format"),
                     (b"\x0b\x0c", "not a well-formed ONNX model")):  # a group
        write(scene.bundle, bad)
        with pytest.raises(BundleError, match=why):
            load_bundle(scene.bundle)
    # 40 graphs each in a node's attribute: 120 message levels, past protobuf's limit of 100
    # (onnx cannot even build it), so written as wire format by hand
    def field(number: int, payload: bytes) -> bytes:
        size, head = len(payload), b""
        while size >= 0x80:
            head, size = head + bytes([size & 0x7F | 0x80]), size >> 7
        return bytes([number << 3 | 2]) + head + bytes([size]) + payload

    deep = b""
    for _ in range(40):  # graph.node(1) -> node.attribute(5) -> attribute.g(6) -> graph
        deep = field(1, field(5, field(6, deep)))
    with pytest.raises(BundleError, match="nested more than 100 deep"):
        check_external_data(field(7, deep), GRAPH, 16)
    shallow = b""
    for _ in range(30):
        shallow = field(1, field(5, field(6, shallow)))
    assert check_external_data(field(7, shallow), GRAPH, 16) == 0


def test_a_real_exported_bundle_with_one_hostile_tensor_added_is_refused(
        scene: Scene, sessions: list[Any]) -> None:
    """The exporter's own graphs walk as protobuf reads them; a server that adds one tensor
    pointing outside and re-hashes the manifest (as a hostile one would) is refused."""
    export_split("cnn", (1, 8, 8), 10, scene.bundle)
    files = read_bundle_files(scene.bundle)
    for name, data in files.items():
        if name.endswith(".onnx"):
            assert found(data) == sorted(reference_refs(onnx.load_from_string(data))) == []
    model = onnx.load_from_string(files[GRAPH])
    model.graph.initializer.append(external("unused", "../secret"))
    graph = model.SerializeToString()
    (scene.bundle / GRAPH).write_bytes(graph)
    manifest = json.loads((scene.bundle / MANIFEST).read_text())
    manifest["files"][GRAPH] = sha256_bytes(graph)
    (scene.bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="train.onnx: tensor 'unused' asks for external data "
                                          "from '../secret'"):
        load_bundle(scene.bundle)
    assert sessions == []


# -- symlinks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [GRAPH_DATA, GRAPH, WEIGHTS, MANIFEST])
def test_a_bundle_file_that_is_a_symlink_is_refused_not_followed(scene: Scene,
                                                                 sessions: list[Any],
                                                                 name: str) -> None:
    write(scene.bundle, train_graph(external("c", GRAPH_DATA)))
    outside = scene.root / f"outside-{name}"
    (scene.bundle / name).rename(outside)  # the very same bytes, so every sha256 matches
    (scene.bundle / name).symlink_to(outside)
    with pytest.raises(BundleError, match=f"{name} is a symbolic link.*help: copy the real file"):
        load_bundle(scene.bundle)
    assert sessions == []


# -- defence in depth: with the check switched off, ONNX Runtime still looks nowhere else ------
def test_without_the_check_a_relative_name_resolves_only_in_the_bundle_folder(
        scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second layer, ONNX Runtime's external-data folder: honoured from about 1.21 on
    (1.20.1 still reads from the working directory), which is why the check comes first."""
    monkeypatch.setattr(bundle_mod, "check_external_data", lambda *args: 0)
    write(scene.bundle, train_graph(external("c", "decoy")))
    decoy = np.full(4, 9.0, dtype="<f4")
    (scene.bundle / "decoy").write_bytes(decoy.tobytes())
    (scene.work / "decoy").write_bytes(SECRET_BYTES)  # the one a cwd lookup would find
    model = LocalModel(load_bundle(scene.bundle), threads=1)
    np.testing.assert_allclose(smashed_minus_x(model), decoy, atol=1e-5)
    # held only in memory (no data file): a name in the cwd is not found either
    write(scene.root / "mem", train_graph(external("c", "secret")), data=None)
    in_memory = bundle_from_files(read_bundle_files(scene.root / "mem"))
    assert in_memory.data_folder == bundle_mod.NO_DATA_FOLDER
    with pytest.raises(BundleError, match="ONNX Runtime cannot load the bundle's graph"):
        LocalModel(in_memory, threads=1)


# -- tampered files --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [GRAPH, WEIGHTS, GRAPH_DATA, "segment0.onnx", "segment1.onnx"])
def test_a_file_that_does_not_match_its_sha256_is_refused(scene: Scene, sessions: list[Any],
                                                          name: str) -> None:
    write(scene.bundle, train_graph(external("c", GRAPH_DATA)),
          segments=segment_graphs(external("c", GRAPH_DATA)))
    data = bytearray((scene.bundle / name).read_bytes())
    data[-1] ^= 0x01
    (scene.bundle / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{name} sha256 .* does not match.*help:"):
        load_bundle(scene.bundle)
    with pytest.raises(BundleError, match=rf"{name} sha256"):
        bundle_from_files(read_bundle_files(scene.bundle))
    assert sessions == []


# -- the device, fed by a hostile server --------------------------------------------------------
class Harness:
    """A real Device whose transport's reassembler and codec get the payloads; what it
    publishes is kept, encoded, instead of going to a broker."""

    def __init__(self, scene: Scene, profile: Profile | None = None) -> None:
        shard = scene.root / "shard.npz"
        rng = np.random.default_rng(2)
        np.savez(shard, x=rng.standard_normal((8, 4)).astype(np.float32),
                 y=(np.arange(8) % 2).astype(np.int64))
        self.cache = scene.root / "cache"
        self.device = Device(DeviceOptions(broker="mqtt://127.0.0.1:1", device_id=DEV,
                                           data=shard, bundle_cache=self.cache,
                                           profile=profile))
        self.sent: list[tuple[str, Message, bytes]] = []

        def publish(topic: str, msg: Message, *, retain: bool = False,
                    wait: float | None = None) -> int:
            payload = b"".join(chunk(encode(msg), msg.msg_id))
            self.sent.append((topic, msg, payload))
            return len(payload)
        self.device.transport.publish = publish  # type: ignore[method-assign]

    def deliver(self, topic: str, msg: Message) -> None:
        """As the broker would: chunk by chunk through paho's callback, then the loop."""
        t = self.device.transport
        for part in chunk(encode(msg), msg.msg_id):
            t._on_message(None, None, SimpleNamespace(topic=topic, payload=part))
            while (inc := t.get(timeout=0)) is not None:
                self.device._receive(inc)

    def online(self, run: str = "run-1") -> None:
        self.deliver(topics.server_status(P), Presence(run, -1, "server", state="online"))

    def sent_kinds(self) -> list[str]:
        return [m.kind for _, m, _ in self.sent]

    def errors(self) -> list[str]:
        return [m.error for _, m, _ in self.sent if m.kind == "error"]  # type: ignore[attr-defined]


def bundle_message(files: dict[str, bytes], run: str = "run-1") -> BundleFiles:
    names = tuple(files)
    return BundleFiles(run, 0, "server", names=names,
                       blobs=tuple(np.frombuffer(files[n], dtype=np.uint8) for n in names))


BUNDLE_TOPIC = topics.down_device(DEV, "bundle", P)


@pytest.mark.parametrize("with_data", [True, False], ids=["stored", "in-memory"])
@pytest.mark.parametrize("hostile", ["../secret", "secret", "ABSOLUTE", "/etc/passwd"])
def test_the_device_refuses_a_hostile_bundle_reports_it_and_writes_nothing(
        scene: Scene, sessions: list[Any], hostile: str, with_data: bool) -> None:
    write(scene.bundle, train_graph(external("c", location(scene, hostile))),
          data=C.tobytes() if with_data else None)
    files = read_bundle_files(scene.bundle)
    h = Harness(scene)
    h.online()
    before = tree(scene.root)
    with pytest.raises(DeviceExit, match="cannot use the server's bundle: .*asks for external "
                                         "data") as exc:
        h.deliver(BUNDLE_TOPIC, bundle_message(files))
    assert exc.value.code == 4
    assert h.sent_kinds() == ["join", "error"]
    assert "bundle rejected" in h.errors()[0] and "asks for external data" in h.errors()[0]
    assert sessions == []
    assert tree(scene.root) == before  # not even a staging folder in the cache
    assert all(SECRET_BYTES not in payload for _, _, payload in h.sent)


def test_the_device_stores_a_good_bundle_only_in_its_cache_folder(
        scene: Scene, sessions: list[Any]) -> None:
    write(scene.bundle, train_graph(external("c", GRAPH_DATA)))
    files = read_bundle_files(scene.bundle)
    h = Harness(scene)
    h.online()
    before = tree(scene.root)
    h.deliver(BUNDLE_TOPIC, bundle_message(files))
    after = tree(scene.root)
    new = {k for k in after if after[k] != before.get(k)}
    folders = {Path(k).parent for k in new}
    assert len(folders) == 1 and next(iter(folders)).parent == Path("cache")
    assert {Path(k).name for k in new} == set(files)
    assert set(before) <= set(after)  # nothing removed either
    joins = [m for _, m, _ in h.sent if isinstance(m, Join)]
    assert joins[-1].bundle_sha256 == load_bundle(scene.bundle).manifest.files[GRAPH]  # ready
    assert isinstance(h.device.model, LocalModel) and sessions
    np.testing.assert_allclose(smashed_minus_x(h.device.model), C, atol=1e-6)
    assert all(SECRET_BYTES not in payload for _, _, payload in h.sent)


@pytest.mark.parametrize("name", [GRAPH, WEIGHTS, GRAPH_DATA])
def test_the_device_refuses_a_tampered_bundle(scene: Scene, sessions: list[Any],
                                              name: str) -> None:
    write(scene.bundle, train_graph(external("c", GRAPH_DATA)))
    files = read_bundle_files(scene.bundle)
    files[name] = files[name][:-1] + bytes([files[name][-1] ^ 1])
    h = Harness(scene)
    h.online()
    with pytest.raises(DeviceExit, match=rf"{name} sha256 .* does not match") as exc:
        h.deliver(BUNDLE_TOPIC, bundle_message(files))
    assert exc.value.code == 4 and "bundle rejected" in h.errors()[0]
    assert sessions == []
    assert not [p for p in h.cache.rglob("*") if p.is_file()]  # nothing kept in the cache


# -- oversized bundles ------------------------------------------------------------------------
def test_a_message_over_the_receivers_limit_is_refused_at_its_first_chunk() -> None:
    r = Reassembler(max_message_bytes=10_000)
    big = chunk(os.urandom(20_000), new_msg_id(), max_payload=5_000)
    for part in big:  # every chunk of it, first or not, is refused: none is kept
        with pytest.raises(CodecError, match="message of 20000 bytes is over the 10000 bytes"):
            r.add("t", part)
    small = chunk(b"x" * 9_000, new_msg_id(), max_payload=5_000)
    assert r.add("t", small[0]) is None and r.add("t", small[1]) == b"x" * 9_000


def test_the_device_takes_at_most_half_what_its_budget_leaves() -> None:
    limit = message_limit(None)
    assert MAX_CHUNK_PAYLOAD <= limit <= MAX_MESSAGE_BYTES
    tiny = Profile("tiny", "a 1 MB budget", memory_mb=1, budget_mb=1, cores=1, threads=1,
                   source="test")
    assert message_limit(tiny) == MAX_CHUNK_PAYLOAD  # over budget already: one chunk at most
    roomy = Profile("roomy", "", memory_mb=1 << 20, budget_mb=1 << 20, cores=1, threads=1,
                    source="test")
    assert message_limit(roomy) == limit  # capped at what the machine has, as the budget is


def test_a_bundle_larger_than_the_device_can_hold_is_refused_before_it_is_held(
        scene: Scene, sessions: list[Any]) -> None:
    big = np.random.default_rng(3).bytes(3 * MAX_CHUNK_PAYLOAD)  # 3 MB of frozen data
    write(scene.bundle, train_graph(external("c", GRAPH_DATA)), data=C.tobytes() + big)
    files = read_bundle_files(scene.bundle)
    tiny = Profile("tiny", "a 1 MB budget", memory_mb=1, budget_mb=1, cores=1, threads=1,
                   source="test")
    h = Harness(scene, tiny)
    assert h.device.max_message_bytes == MAX_CHUNK_PAYLOAD
    h.online()
    msg = bundle_message(files)
    first = chunk(encode(msg), msg.msg_id)[0]
    with pytest.raises(DeviceExit, match=r"message was refused \(message of \d+ bytes is over "
                                         r"the 1000000 bytes.*help: a --profile") as exc:
        h.device.transport._on_message(None, None,
                                       SimpleNamespace(topic=BUNDLE_TOPIC, payload=first))
        while (inc := h.device.transport.get(timeout=0)) is not None:
            h.device._receive(inc)
    assert exc.value.code == 4 and "bundle rejected" in h.errors()[0]
    # the declared size was refused, so nothing was booked for the rest of the message
    assert not h.device.transport._reassembler._pending
    assert sessions == [] and not h.cache.exists()


# -- only the server of the joined run ------------------------------------------------------------
def test_the_device_obeys_only_the_run_it_joined_and_counts_the_rest(
        scene: Scene, sessions: list[Any]) -> None:
    plain = helper.make_tensor("c", FLOAT, [4], C.tolist())  # held in the graph itself
    write(scene.bundle, train_graph(plain), data=None)
    files = read_bundle_files(scene.bundle)
    h = Harness(scene)
    d = h.device
    h.deliver(BUNDLE_TOPIC, bundle_message(files))  # before any server presence: no run yet
    assert d.bundle is None and d.ignored == {"bundle for another run": 1}
    h.online("run-1")
    assert d.run_id == "run-1" and h.sent_kinds() == ["join"]
    weights = np.zeros(8, dtype=np.float32)
    for topic, msg in [
        (BUNDLE_TOPIC, bundle_message(files, run="run-2")),
        (topics.down_all("round", P), RoundStart("run-2", 1, "server", weights=weights,
                                                 participants=(DEV,))),
        (topics.down_all("stop", P), Stop("run-2", 1, "server", reason="forged")),
        (topics.down_device(DEV, "grad", P), Gradient("run-2", 1, "server", step=0,
                                                       grad=np.zeros((1, 4), np.float32))),
        # the run id is learnt only from the server's presence topic, with sender "server"
        (topics.down_all("round", P), Presence("run-2", -1, "server", state="online")),
        (BUNDLE_TOPIC, Presence("run-2", -1, "server", state="online")),
        (topics.server_status(P), Presence("run-2", -1, "dev-1", state="online")),
        (topics.down_all("stop", P), RoundStart("run-1", 1, "server", weights=weights,
                                                participants=(DEV,))),
        (topics.down_all("round", P), RoundStart("run-1", 1, "dev-1", weights=weights,
                                                 participants=(DEV,))),
        (topics.down_device("dev-1", "bundle", P), bundle_message(files)),
        # an offline presence of another run does not end this one
        (topics.server_status(P), Presence("run-2", -1, "server", state="offline")),
    ]:
        h.deliver(topic, msg)  # none of these raises, none is acted on
    assert d.run_id == "run-1" and d.bundle is None and h.sent_kinds() == ["join"]
    assert d.ignored == {"bundle for another run": 2, "round for another run": 1,
                         "stop for another run": 1, "grad for another run": 1,
                         "message on the wrong topic": 6}
    t = d.transport
    t._on_message(None, None, SimpleNamespace(topic=topics.down_all("round", P),
                                              payload=b"HRC1 not a chunk at all........."))
    while (inc := t.get(timeout=0)) is not None:
        d._receive(inc)
    assert d.ignored["undecodable payload"] == 1
    assert sessions == []
    h.deliver(BUNDLE_TOPIC, bundle_message(files, run="run-1"))  # the joined run's: taken
    assert d.bundle is not None and sessions
    assert h.sent_kinds()[-1] == "join" and h.sent[-1][1].bundle_sha256  # type: ignore[attr-defined]
    with pytest.raises(DeviceExit, match="server ended the run") as exc:
        h.deliver(topics.down_all("stop", P), Stop("run-1", 1, "server", reason="finished"))
    assert exc.value.code == 0


def test_only_the_server_account_may_publish_on_what_a_device_obeys() -> None:
    """What the provisioned broker's ACL guarantees, read from the ACL the fleet gets: of all
    accounts, only the server's may write a topic any device acts on (a real Mosquitto
    enforcing it: tests/test_security.py)."""
    ids = ["dev-0", "dev-1", "dev-2"]
    writers: dict[str, list[str]] = {}
    user = None
    for line in acl_text(ids).splitlines():
        if line.startswith("user "):
            user = line.split()[1]
        elif line.startswith("topic "):
            assert user is not None
            if "write" in line.split()[1]:
                writers.setdefault(user, []).append(line.split()[2])
        else:
            assert not line.startswith("pattern"), line
    for dev in ids:
        obeyed = server_kinds(dev, P)
        for topic in [*obeyed, *topics.device_subscriptions(dev, P)]:
            may = {u for u, pats in writers.items() if any(topic_matches_sub(p, topic)
                                                           for p in pats)}
            assert may == {SERVER_USER}, topic
        assert all(any(topic_matches_sub(sub, t) for sub in topics.device_subscriptions(dev, P))
                   for t in obeyed)


# -- the wire-format walker against the onnx package ---------------------------------------------
KIND_NAMES = {external_data._MODEL: "ModelProto", external_data._GRAPH: "GraphProto",
              external_data._NODE: "NodeProto", external_data._ATTR: "AttributeProto",
              external_data._SPARSE: "SparseTensorProto",
              external_data._TRAINING: "TrainingInfoProto",
              external_data._FUNCTION: "FunctionProto", external_data._TENSOR: "TensorProto"}


def test_the_walkers_field_table_is_every_path_from_a_model_to_a_tensor() -> None:
    """Checked against onnx's own schema: every message on some path from ModelProto to
    TensorProto is walked, through every field that leads on (so a future ONNX field holding
    tensors fails here), and the tensor fields read are the schema's."""
    def msg(name: str) -> Any:
        return getattr(onnx, name).DESCRIPTOR

    reaches: dict[str, bool] = {}

    def leads_to_tensor(d: Any, seen: frozenset[str] = frozenset()) -> bool:
        if d.name == "TensorProto":
            return True
        if d.full_name in seen:
            return reaches.get(d.full_name, False)
        found = False
        for f in d.fields:
            if f.message_type is not None and leads_to_tensor(f.message_type,
                                                              seen | {d.full_name}):
                found = True
        reaches[d.full_name] = reaches.get(d.full_name, False) or found
        return found

    names = {v: k for k, v in KIND_NAMES.items()}
    todo, walked = ["ModelProto"], set()
    while todo:
        name = todo.pop()
        if name in walked or name == "TensorProto":
            continue
        walked.add(name)
        want = {f.number: names.get(f.message_type.name) for f in msg(name).fields
                if f.message_type is not None and leads_to_tensor(f.message_type)}
        assert None not in want.values(), (name, want)
        assert external_data._HOLDS[names[name]] == want, name
        todo.extend(KIND_NAMES[k] for k in want.values())
    assert walked | {"TensorProto"} == set(KIND_NAMES.values())
    tensor = msg("TensorProto").fields_by_name
    assert (tensor["name"].number, tensor["external_data"].number,
            tensor["data_location"].number) == (external_data._TENSOR_NAME,
                                                external_data._TENSOR_EXTERNAL_DATA,
                                                external_data._TENSOR_DATA_LOCATION)
    entry = msg("StringStringEntryProto").fields_by_name
    assert (entry["key"].number, entry["value"].number) == (1, 2)
    assert TensorProto.EXTERNAL == external_data._EXTERNAL


def reference_refs(m: Any) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """The same answer by protobuf reflection over every field of every message."""
    if isinstance(m, TensorProto):
        if m.data_location == TensorProto.EXTERNAL or len(m.external_data):
            return [(m.name, tuple((e.key, e.value) for e in m.external_data))]
        return []
    out = []
    for field, value in m.ListFields():
        if field.message_type is not None:
            for item in ([value] if hasattr(value, "ListFields") else value):
                out += reference_refs(item)
    return out


def found(graph: bytes) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return sorted((r.tensor, r.entries) for r in external_refs(graph))


@pytest.mark.parametrize("place", PLACES)
def test_the_walker_finds_what_protobuf_finds(place: str) -> None:
    graph = train_graph(external("c", "../secret"), place)
    assert found(graph) == sorted(reference_refs(onnx.load_from_string(graph)))
    assert [loc for _, e in found(graph) for k, loc in e if k == "location"] == ["../secret"]


@st.composite
def models(draw: st.DrawFn) -> onnx.ModelProto:
    """Graphs nested in If branches and attribute lists, tensors anywhere, some external."""
    counter = iter(range(10_000))

    def tensor() -> TensorProto:
        name = f"t{next(counter)}"
        if draw(st.booleans()):
            return external(name, draw(st.sampled_from(["a", "../b", GRAPH_DATA, ""])),
                            extra=tuple(draw(st.lists(st.tuples(st.sampled_from(
                                ["checksum", "location"]), st.text(max_size=3)), max_size=2))))
        return helper.make_tensor(name, FLOAT, [1], [1.0])

    def graph(depth: int) -> onnx.GraphProto:
        nodes = []
        for _ in range(draw(st.integers(0, 2))):
            attrs: dict[str, Any] = {}
            if draw(st.booleans()):
                attrs["value"] = tensor()
            if draw(st.booleans()):
                attrs["many"] = [tensor() for _ in range(draw(st.integers(1, 2)))]
            if depth < 3 and draw(st.booleans()):
                attrs["then_branch"] = graph(depth + 1)
            if depth < 3 and draw(st.booleans()):
                attrs["bodies"] = [graph(depth + 1) for _ in range(draw(st.integers(1, 2)))]
            nodes.append(helper.make_node("Op", [], [], **attrs))
        inits = [tensor() for _ in range(draw(st.integers(0, 2)))]
        sparse = [helper.make_sparse_tensor(tensor(), helper.make_tensor(
            f"i{next(counter)}", INT64, [1], [0]), [1]) for _ in range(draw(st.integers(0, 1)))]
        return helper.make_graph(nodes, "g", [], [], inits, sparse_initializer=sparse)

    model = helper.make_model(graph(0))
    if draw(st.booleans()):
        model.training_info.add().algorithm.CopyFrom(graph(2))
    return model


@settings(max_examples=60, deadline=None)
@given(models(), models())
def test_the_walker_agrees_with_protobuf_on_any_model(a: onnx.ModelProto,
                                                      b: onnx.ModelProto) -> None:
    assert found(a.SerializeToString()) == sorted(reference_refs(a))
    # two serializations back to back parse as one model, their graphs merged
    both = a.SerializeToString() + b.SerializeToString()
    assert found(both) == sorted(reference_refs(onnx.load_from_string(both)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_walked_or_refused_as_malformed(data: bytes) -> None:
    try:
        check_external_data(data, GRAPH, 16)
    except BundleError as exc:
        assert "train.onnx" in str(exc)


# -- the whole device process against a hostile server on a real broker ---------------------------
@pytest.mark.broker
def test_a_device_process_refuses_a_hostile_server_over_mosquitto(scene: Scene,
                                                                   mosquitto: str) -> None:
    """`heron device` run in a folder holding a secret, against a server that first sends a
    good bundle for another run (ignored), then one asking for ../secret: the device reports
    the refusal to the server and exits 4; the secret never leaves, the cache stays empty."""
    good, bad = scene.root / "good", scene.root / "bad"
    write(good, train_graph(external("c", GRAPH_DATA)))
    write(bad, train_graph(external("c", "../secret")))
    shard = scene.root / "shard.npz"
    np.savez(shard, x=np.ones((8, 4), np.float32), y=(np.arange(8) % 2).astype(np.int64))
    server = MqttTransport(mosquitto, "hostile-server", topics.server_subscriptions(P))
    server.start()
    cache = scene.root / "cache"
    device = subprocess.Popen(
        heron("device", "--broker", mosquitto, "--id", DEV, "--data", str(shard),
              "--threads", "1", "--bundle-cache", str(cache)),
        cwd=scene.work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    got: list[tuple[str, Message, int]] = []

    def until(kind: str, timeout: float = 60.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            inc = server.get(timeout=0.5)
            if inc is not None and inc.message is not None:
                got.append((inc.topic, inc.message, inc.nbytes))
                if inc.message.kind == kind:
                    return inc.message
        device.kill()
        raise AssertionError(f"no {kind} from the device; it said: "
                             f"{device.communicate()[0][-3000:]}")
    try:
        server.publish(topics.server_status(P),
                       Presence("run-1", -1, "server", state="online"), retain=True)
        until("join")
        server.publish(BUNDLE_TOPIC, bundle_message(read_bundle_files(good), run="run-0"))
        server.publish(BUNDLE_TOPIC, bundle_message(read_bundle_files(bad), run="run-1"))
        error = until("error")
        output, _ = device.communicate(timeout=60)
    finally:
        if device.poll() is None:
            device.kill()
            device.communicate()
        server.stop()
    assert device.returncode == 4, output[-3000:]
    assert "asks for external data from '../secret'" in error.error  # type: ignore[attr-defined]
    assert "ignoring bundle for another run" in output
    # never ready with either bundle: one join (without a bundle), then the error
    assert [m.kind for t, m, _ in got if topics.parse_up(t, P)] == ["join", "error"]
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]
    assert all(SECRET_BYTES not in encode(m) for _, m, _ in got)
