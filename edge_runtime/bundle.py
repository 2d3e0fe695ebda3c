"""Device bundle: the ONNX training graph, its initial weights and a manifest, on disk or
in memory: writing, reading, verifying and storing one.

What the manifest says (graph interface, parameter and segment layout) is in
`edge_runtime.manifest`. Layout of a bundle directory::

    manifest.json   what the graph expects and produces, trainable params, file sha256s
    train.onnx      inputs: x, y, one input per trainable param; outputs: loss, smashed, logits
    weights.bin     trainable params, float32 little-endian, concatenated in manifest order
    train.onnx.data (only for graphs with large frozen tensors, e.g. minilm's embeddings)
                    train.onnx's initializers as ONNX external data, page-aligned, so ONNX
                    Runtime memory-maps them from disk instead of copying them into the
                    process: only the pages a forward touches become resident, and they
                    stay reclaimable file pages. Such a bundle must be on disk to run
                    (`Bundle.root`; a device stores one it receives, `store_bundle_files`).
    segment*.onnx   the optional segment chain (`edge_runtime.manifest`)
    tail.onnx       the optional tail-gradient graph (`heron-tail`, `edge_runtime.manifest`)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import external_data
from edge_runtime.manifest import (
    INPUT_DTYPES,
    PLAIN_FILE_NAME,
    BundleError,
    Manifest,
    SegmentGraphs,
    SegmentSpec,
    TailSpec,
    param_specs,
    unflatten,
)

MANIFEST = "manifest.json"
GRAPH = "train.onnx"
GRAPH_DATA = "train.onnx.data"  # external data of train.onnx, where the bundle has it
WEIGHTS = "weights.bin"
TAIL_GRAPH = "tail.onnx"


# -- external data: the one file a bundle's graphs may read from --------------------------------
# An ONNX tensor can keep its bytes in a file named by its `external_data` entry "location".
# For a model loaded from bytes (as the device loads every graph) ONNX Runtime resolves a
# relative location against the folder set in EXTERNAL_FOLDER_KEY, or the process's working
# directory; and only recent releases refuse locations that leave that folder. Measured with
# a graph whose tensor names a planted file: 1.17.3 to 1.20.1 ignore the folder and read
# "secret" and "../secret" from the working directory; 1.22.0 honours the folder but still
# reads "../secret", absolute paths and symlinks out of it; 1.32.0 refuses all of them. So a
# graph from a hostile server could make a device read any file it can open (its
# credentials, its shard) and upload the bytes as smashed data. The device therefore
# (1) refuses, before any session exists, a graph whose tensors name any location but the
# bundle's own GRAPH_DATA, or a range outside it (`check_external_data`), whatever its ONNX
# Runtime, and (2) sets EXTERNAL_FOLDER_KEY to the bundle's folder on every session
# (`Bundle.session_config`), so that where ONNX Runtime honours it a relative name can
# resolve nowhere else.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# ...and every session parses its bytes as an ONNX protobuf, never as ONNX Runtime's own
# flatbuffer format, which `check_external_data` does not read
MODEL_FORMAT_KEY, MODEL_FORMAT = "session.load_model_format", "ONNX"
# a bundle held only in memory has no external data (checked); its sessions get a folder that
# cannot exist, a path below the null device, so nothing can resolve against the cwd either
NO_DATA_FOLDER = Path(os.devnull) / "heron-bundle-has-no-external-data"


def check_external_data(graph: bytes | memoryview, file: str, data_size: int | None) -> int:
    """`external_data.check_external_data` against this bundle's GRAPH_DATA, as a BundleError."""
    try:
        return external_data.check_external_data(graph, file, data_size, GRAPH_DATA)
    except external_data.UnsafeGraphError as exc:
        raise BundleError(str(exc)) from exc


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bundle(
    out_dir: str | Path,
    *,
    onnx_bytes: bytes,
    params: list[tuple[str, np.ndarray, str]],
    model: str,
    cut: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    smashed_shape: tuple[int, ...],
    opset: int,
    extra: dict[str, Any] | None = None,
    input_dtype: str = "float32",
    segments: list[SegmentGraphs] | None = None,
    graph_data: bytes | None = None,
    tail: tuple[bytes, str, tuple[str, ...], int] | None = None,
) -> Manifest:
    """Write a bundle directory; `params` are (graph input name, value, role) in feed order.

    `graph_data`, optional: the external data `onnx_bytes` refers to as GRAPH_DATA.

    `segments`, optional: the segment chain in order, the last being aux head + loss; they
    must own `params` back to back.

    `tail`, optional: (ONNX bytes, tail set, trained param names, batch) of the
    tail-gradient graph, written as TAIL_GRAPH.
    """
    if input_dtype not in INPUT_DTYPES:
        raise BundleError(f"input dtype {input_dtype!r} is not one of {INPUT_DTYPES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = param_specs([(n, tuple(v.shape), r) for n, v, r in params])
    flat = np.concatenate([np.asarray(v, dtype="<f4").ravel() for _, v, _ in params])
    weights_bytes = flat.astype("<f4").tobytes()
    (out / GRAPH).write_bytes(onnx_bytes)
    (out / WEIGHTS).write_bytes(weights_bytes)
    files = {GRAPH: sha256_bytes(onnx_bytes), WEIGHTS: sha256_bytes(weights_bytes)}
    if graph_data is not None:
        (out / GRAPH_DATA).write_bytes(graph_data)
        files[GRAPH_DATA] = sha256_bytes(graph_data)
    seg_specs, index, offset = [], 0, 0
    for i, seg in enumerate(segments or []):
        owned = specs[index:index + seg.num_params]
        if len(owned) != seg.num_params:
            raise BundleError(f"segments claim more than the {len(specs)} params")
        file, nchwc_file = f"segment{i}.onnx", f"segment{i}.nchwc.onnx"
        for name, data in ((file, seg.graph), (nchwc_file, seg.nchwc)):
            if data is not None:
                (out / name).write_bytes(data)
                files[name] = sha256_bytes(data)
        size = sum(p.size for p in owned)
        seg_specs.append(SegmentSpec(seg.name, file, offset, size, tuple(p.name for p in owned),
                                     None if seg.nchwc is None else nchwc_file))
        index, offset = index + seg.num_params, offset + size
    if segments and index != len(specs):
        raise BundleError(f"segments own {index} of the {len(specs)} params")
    tail_spec = None
    if tail is not None:
        tail_bytes, tail_set, trained, batch = tail
        (out / TAIL_GRAPH).write_bytes(tail_bytes)
        files[TAIL_GRAPH] = sha256_bytes(tail_bytes)
        tail_spec = TailSpec(TAIL_GRAPH, tail_set, tuple(trained), int(batch))
    manifest = Manifest(
        model=model, cut=cut, input_shape=tuple(input_shape), num_classes=num_classes,
        smashed_shape=tuple(smashed_shape), opset=opset, params=specs,
        files=files, extra=dict(extra or {}), input_dtype=input_dtype,
        segments=tuple(seg_specs), tail=tail_spec,
    )
    # the same checks a device makes on a received manifest
    manifest = Manifest.from_json(json.loads(json.dumps(manifest.to_json())))
    (out / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


@dataclass(frozen=True)
class Bundle:
    """A verified bundle in memory."""

    manifest: Manifest
    graph: bytes
    weights: np.ndarray  # flat float32
    segments: tuple[bytes, ...] = ()  # ONNX bytes per manifest segment, if it has them
    nchwc_segments: tuple[bytes | None, ...] = ()  # their NCHWc variants, where shipped
    root: Path | None = None  # the directory it was verified in (load_bundle), if on disk
    tail: bytes | None = None  # the tail-gradient graph (manifest.tail), if it has one

    @property
    def data_folder(self) -> Path:
        """The one folder ONNX Runtime may read external tensors from (EXTERNAL_FOLDER_KEY):
        the bundle's own, or NO_DATA_FOLDER for a bundle held only in memory, whose graphs
        were checked to have no external tensors. Raises BundleError where `external_data`
        does."""
        data = self.external_data
        if data is not None:
            return data.parent
        return self.root if self.root is not None else NO_DATA_FOLDER

    def session_config(self) -> dict[str, str]:
        """The ONNX Runtime session config entries every session over this bundle's graphs
        gets: external data from `data_folder` only, and ONNX format only."""
        return {EXTERNAL_FOLDER_KEY: str(self.data_folder), MODEL_FORMAT_KEY: MODEL_FORMAT}

    @property
    def external_data(self) -> Path | None:
        """Where train.onnx's external data lies, if it has any (None: all in the graph).

        Raises BundleError for such a bundle held only in memory (from MQTT, say)."""
        if GRAPH_DATA not in self.manifest.files:
            return None
        if self.root is None:
            raise BundleError(f"the graph keeps its frozen tensors in {GRAPH_DATA}, which "
                              "ONNX Runtime maps from disk; help: store the bundle files in "
                              "a directory (store_bundle_files) and load_bundle it")
        return self.root / GRAPH_DATA

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views into `flat`, one per graph input, without copying."""
        return unflatten(self.manifest.params, flat)


def decode_weights(data: bytes, manifest: Manifest) -> np.ndarray:
    if len(data) != 4 * manifest.num_params:
        raise BundleError(
            f"{WEIGHTS} holds {len(data)} bytes but the manifest's params need "
            f"{4 * manifest.num_params}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def _mismatch(name: str, got: str, want: str) -> BundleError:
    return BundleError(
        f"{name} sha256 {got[:12]}… does not match the manifest's {want[:12]}…; help: the "
        "bundle was corrupted or tampered with, re-export it or let the device fetch it "
        "from the server")


def _parse_manifest(files: Mapping[str, bytes | memoryview]) -> Manifest:
    if MANIFEST not in files:
        raise BundleError(f"bundle has no {MANIFEST}")
    try:
        return Manifest.from_json(json.loads(bytes(files[MANIFEST]).decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST} is not valid JSON: {exc}") from exc


def _graph_files(manifest: Manifest) -> list[str]:
    """The ONNX graphs of a bundle: the training graph, every segment (NCHWc too) and the
    tail graph."""
    tail = [manifest.tail.file] if manifest.tail is not None else []
    return [GRAPH, *(f for s in manifest.segments for f in (s.file, s.nchwc_file) if f), *tail]


def _verify(manifest: Manifest, files: Mapping[str, bytes | memoryview], names: list[str],
            data_size: int | None) -> None:
    """sha256 of `names` against the manifest, then the graphs' external-data references:
    a graph may read only `data_size` bytes of GRAPH_DATA (None: there is none)."""
    for name in names:
        if name not in manifest.files:
            raise BundleError(f"manifest lists no sha256 for {name}")
        if name not in files:
            raise BundleError(f"bundle is missing {name}")
        got = sha256_bytes(files[name])
        if got != manifest.files[name]:
            raise _mismatch(name, got, manifest.files[name])
    if GRAPH_DATA not in manifest.files:
        data_size = None
    for name in _graph_files(manifest):
        check_external_data(files[name], name, data_size)


def bundle_from_files(files: dict[str, bytes], root: Path | None = None) -> Bundle:
    """Verify raw file contents (from disk or from MQTT) against the manifest's sha256, and
    that its graphs read external data from nowhere but the bundle's GRAPH_DATA.

    GRAPH_DATA is checked here when it is in `files`; `load_bundle` hashes it on disk
    instead (`root`), so its bytes never enter the process."""
    manifest = _parse_manifest(files)
    data = [GRAPH_DATA] if GRAPH_DATA in manifest.files and root is None else []
    data_size = None
    if GRAPH_DATA in manifest.files:
        data_size = (len(files.get(GRAPH_DATA, b"")) if root is None  # _verify: missing?
                     else _regular_file(root, GRAPH_DATA).st_size)
    _verify(manifest, files, [*_graph_files(manifest), WEIGHTS, *data], data_size)
    return Bundle(manifest, files[GRAPH], decode_weights(files[WEIGHTS], manifest),
                  tuple(files[s.file] for s in manifest.segments),
                  tuple(files[s.nchwc_file] if s.nchwc_file else None
                        for s in manifest.segments), root=root,
                  tail=None if manifest.tail is None else bytes(files[manifest.tail.file]))


def sha256_file(path: Path) -> str:
    """sha256 of a file read in 1 MiB pieces (a bundle's data file can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _regular_file(root: Path, name: str) -> os.stat_result:
    """A bundle file's stat; BundleError if it is missing, or not a regular file of the
    folder itself (a symbolic link could point anywhere, so it is never followed)."""
    try:
        st = os.lstat(root / name)
    except OSError as exc:
        raise BundleError(f"bundle is missing {name}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"bundle file {name} is a symbolic link; a bundle's files must lie "
                          f"in its own folder {root}; help: copy the real file there")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"bundle file {name} is not a regular file")
    return st


def read_bundle_files(path: str | Path, *, data: bool = True) -> dict[str, bytes]:
    """The bundle's files as bytes (to verify, or to ship over MQTT); GRAPH_DATA only
    with `data`. A file that is a symbolic link is refused, not followed."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist; help: run `heron export`")
    names = [MANIFEST, GRAPH, WEIGHTS]
    try:  # segment files are named in the manifest; bundle_from_files checks the rest
        listed = json.loads((root / MANIFEST).read_text()).get("files", {})
        names += [n for n in listed if isinstance(n, str) and PLAIN_FILE_NAME.match(n)
                  and n not in names]
    except (OSError, ValueError, AttributeError):
        pass
    if not data and GRAPH_DATA in names:
        names.remove(GRAPH_DATA)
    present = [n for n in names if os.path.lexists(root / n)]
    for name in present:
        _regular_file(root, name)
    return {name: (root / name).read_bytes() for name in present}


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle directory; its external graph data stays on disk."""
    root = Path(path).resolve()
    bundle = bundle_from_files(read_bundle_files(root, data=False), root=root)
    want = bundle.manifest.files.get(GRAPH_DATA)
    if want is not None:
        _regular_file(root, GRAPH_DATA)
        got = sha256_file(root / GRAPH_DATA)
        if got != want:
            raise _mismatch(GRAPH_DATA, got, want)
    return bundle


def default_bundle_cache() -> Path:
    """Where a device stores bundles it receives: $HERON_BUNDLE_CACHE, else
    $XDG_CACHE_HOME/heron/bundles, else ~/.cache/heron/bundles (disk, not /tmp, which is
    RAM on many boards and would undo the memory mapping)."""
    if os.environ.get("HERON_BUNDLE_CACHE"):
        return Path(os.environ["HERON_BUNDLE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "heron" / "bundles"


def store_bundle_files(files: Mapping[str, bytes | memoryview], cache: str | Path) -> Path:
    """Write received bundle files into `cache`/<manifest sha256 prefix>/ and return it.

    An existing folder for this manifest is reused once it verifies (`load_bundle`), and
    replaced if it does not. Otherwise nothing is written before every file matches its
    sha256 and the graphs are known to read no external data but GRAPH_DATA's; then only
    plain names inside that one folder are written. The directory appears whole (written
    beside it, then renamed), so devices sharing a cache on one machine also share one
    page-cache copy of the mapped data."""
    manifest = _parse_manifest(files)
    names = [MANIFEST, *(n for n in manifest.files if n != MANIFEST)]
    for name in names:
        if not PLAIN_FILE_NAME.match(name) or name not in files:
            raise BundleError(f"bundle file {name!r} is missing or has a bad name")
    cache = Path(cache)
    target = cache / sha256_bytes(files[MANIFEST])[:16]
    if target.is_dir():
        try:
            load_bundle(target)
            return target
        except BundleError:
            shutil.rmtree(target, ignore_errors=True)
    data = [GRAPH_DATA] if GRAPH_DATA in manifest.files else []
    _verify(manifest, files, [*_graph_files(manifest), WEIGHTS, *data],
            len(files[GRAPH_DATA]) if data else None)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=cache))
    except OSError as exc:
        raise BundleError(f"cannot store the bundle in {cache}: {exc}; help: give the device "
                          "a writable directory on disk with --bundle-cache DIR (or "
                          "$HERON_BUNDLE_CACHE)") from exc
    try:
        for name in names:
            (staging / name).write_bytes(files[name])
        try:
            staging.rename(target)
        except OSError:  # another device of this machine stored it first
            if not target.is_dir():
                raise
    except OSError as exc:
        raise BundleError(f"cannot store the bundle in {cache}: {exc}; help: free disk "
                          f"space there (it needs {sum(map(len, files.values())) >> 20} MB) or "
                          "choose another directory with --bundle-cache DIR") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
