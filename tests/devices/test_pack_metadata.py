"""The pack's reading of wheel metadata and tags, on made-up wheels: no pip, no network."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from devices.pack import (
    PackError,
    board_requirements,
    check_python,
    check_wheels,
    target_tags,
    wheel_metadata,
)

METADATA = """\
Metadata-Version: 2.4
Name: heron-sfl
Version: 0.1.0
Requires-Python: >=3.10
Requires-Dist: onnxruntime>=1.17
Requires-Dist: numpy>=1.24
Requires-Dist: tomli>=2; python_version < "3.11"
Requires-Dist: torch>=2.3; extra == "server"
Requires-Dist: pytest>=8; extra == "test"

Requires-Dist: not-a-header, this is the description
"""


def _wheel(tmp_path: Path, metadata: str = METADATA) -> Path:
    path = tmp_path / "heron_sfl-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("heron_sfl-0.1.0.dist-info/METADATA", metadata)
    return path


def test_runtime_requirements_are_judged_for_the_board_not_this_machine(tmp_path: Path) -> None:
    meta = wheel_metadata(_wheel(tmp_path))
    assert meta.version == "0.1.0" and str(meta.requires_python) == ">=3.10"
    assert board_requirements(meta, "aarch64", (3, 11)) == ["onnxruntime>=1.17", "numpy>=1.24"]
    assert board_requirements(meta, "aarch64", (3, 10)) == [
        "onnxruntime>=1.17", "numpy>=1.24", "tomli>=2"]


def test_requires_python_refuses_an_old_board() -> None:
    check_python((3, 10), SpecifierSet(">=3.10"))
    check_python((3, 7), None)
    with pytest.raises(PackError, match=r"needs Python >=3.10 .*help:"):
        check_python((3, 7), SpecifierSet(">=3.10"))


def test_a_broken_wheel_is_named(tmp_path: Path) -> None:
    with pytest.raises(PackError, match="heron_sfl-0.1.0-py3-none-any.whl"):
        wheel_metadata(_wheel(tmp_path, METADATA.replace(">=1.24", ">=>1")))


def test_wheels_must_install_on_the_board_and_never_be_torch() -> None:
    tags = target_tags("aarch64", (3, 11), (2, 28))
    check_wheels(["numpy-2.1.0-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
                  "psutil-7.0.0-cp36-abi3-manylinux_2_17_aarch64.whl",
                  "onnxruntime-1.20.0-cp311-cp311-manylinux_2_27_aarch64.whl",
                  "paho_mqtt-2.1.0-py3-none-any.whl", "pip-25.0-py3-none-any.whl"],
                 tags, "board")
    with pytest.raises(PackError, match="torch-2.3.0"):
        check_wheels(["torch-2.3.0-cp311-cp311-manylinux_2_17_aarch64.whl"], tags, "board")
    with pytest.raises(PackError, match="does not install on board"):
        check_wheels(["numpy-2.1.0-cp311-cp311-manylinux_2_17_x86_64.whl"], tags, "board")
    with pytest.raises(PackError, match="does not install on board"):  # glibc too new
        check_wheels(["onnxruntime-1.20.0-cp311-cp311-manylinux_2_31_aarch64.whl"], tags,
                     "board")
