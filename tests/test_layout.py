"""What may import what (README, "How the code is laid out"), read from the source's import
statements, so a wrong-way import fails here rather than on a board without torch."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_runtime", "server", "exporter", "devices", "baselines", "heron", "heron_data")
HEAVY = ("torch", "onnx", "sklearn", "amqtt", "tokenizers", "safetensors", "matplotlib")


def imports(package: str) -> dict[str, set[str]]:
    """module path -> every absolute module name it imports (at any level of the file)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        out[str(path.relative_to(ROOT))] = names
    return out


def offenders(package: str, allowed: object) -> list[str]:
    """`file: name` for each import that `allowed(file, name)` refuses."""
    return [f"{file}: {name}" for file, names in imports(package).items()
            for name in sorted(names) if not allowed(file, name)]  # type: ignore[operator]


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_package_list_covers_every_package() -> None:
    found = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert found == set(PACKAGES)


def test_the_device_runtime_never_imports_the_server_side() -> None:
    # a board installs only onnxruntime, numpy, paho-mqtt and psutil
    banned = {p for p in PACKAGES if p != "edge_runtime"} | set(HEAVY)
    assert offenders("edge_runtime", lambda _f, n: top(n) not in banned) == []


def test_the_protocol_imports_nothing_heavier_than_numpy() -> None:
    def ok(_file: str, name: str) -> bool:
        return (top(name) in sys.stdlib_module_names or top(name) == "numpy"
                or name.startswith("edge_runtime.protocol") or name.startswith(
                    "edge_runtime.algorithms"))

    bad = [o for o in offenders("edge_runtime", ok) if o.startswith("edge_runtime/protocol/")]
    assert bad == []


def test_the_algorithm_registry_imports_only_the_standard_library() -> None:
    names = imports("edge_runtime")["edge_runtime/algorithms.py"]
    assert {n for n in names if top(n) not in sys.stdlib_module_names} == set()


# What the server may take from the device runtime: the wire, the registry, bundle
# reading and its manifest, the file helper and the transport; never the device loop or
# its training.
SERVER_FROM_DEVICE = ("edge_runtime.protocol", "edge_runtime.algorithms", "edge_runtime.bundle",
                      "edge_runtime.manifest", "edge_runtime.files", "edge_runtime.transport",
                      # pure numpy ZO math, which the server replays (--device-sync replay)
                      "edge_runtime.zo", "edge_runtime.replay")


@pytest.mark.parametrize("package", ["server", "exporter"])
def test_the_server_and_exporter_take_only_the_shared_parts_of_the_device_runtime(
        package: str) -> None:
    def ok(_file: str, name: str) -> bool:
        if top(name) == "edge_runtime":
            return name == "edge_runtime" or name.startswith(SERVER_FROM_DEVICE)
        return top(name) not in ("devices", "baselines", "heron")

    assert offenders(package, ok) == []


def test_the_data_package_is_apart_from_the_fleet_the_server_and_the_device() -> None:
    banned = {"edge_runtime", "server", "exporter", "devices", "baselines", "heron"}
    assert offenders("heron_data", lambda _f, n: top(n) not in banned) == []


def test_only_the_torch_device_of_the_fleet_imports_torch_or_the_server() -> None:
    def ok(file: str, name: str) -> bool:
        return file == "devices/torch_device.py" or top(name) not in (
            "torch", "server", "exporter", "baselines")

    assert offenders("devices", ok) == []


def test_nothing_but_the_command_and_the_bench_imports_the_command() -> None:
    # the accuracy bench parses `heron run` options to build its centralized twin
    for package in PACKAGES:
        if package in ("heron", "baselines"):
            continue
        bad = offenders(package, lambda _f, n: not n.startswith("heron.cli"))
        assert bad == [], package


def test_test_files_have_unique_names() -> None:
    # pytest imports test modules by file name (rootdir-relative, no __init__.py), so two
    # files of one name in different folders stop collection
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
