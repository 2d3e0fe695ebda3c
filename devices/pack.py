"""`heron devices pack`: an offline install pack for a board, built on the server machine.

A pack is a directory::

    wheels/               heron's own wheel + binary wheels of its runtime dependencies
                          (onnxruntime, numpy, paho-mqtt, psutil and theirs) and pip itself,
                          all for the board's machine type, Python and glibc; never torch
    install.sh            makes a venv and installs from wheels/ with `pip --no-index`
    device.toml           the device's config (`heron device --config`): broker, id, data, ...
    heron-device.service  systemd unit: `heron device --config ...` at boot, restarted on failure
    pack.json             what is inside: target, Python, glibc, every wheel's sha256
    README.txt            the three commands to run on the board

pip downloads wheels for another platform when told its tags (`--platform`,
`--python-version`, `--abi`); with `--only-binary=:all:` it never builds, so a dependency
without a wheel for the target fails here, on the server, and not on the board.

The files other than the wheels are templates in `devices.pack_files`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.metadata import parse_email
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from devices.pack_files import DEVICE_TOML, INSTALL_SH, README, SERVICE
from edge_runtime.profiles import load_profile

TARGETS = {"linux-aarch64": "aarch64", "linux-x86_64": "x86_64", "linux-armv7l": "armv7l"}
DEFAULT_BROKER = "mqtt://heron-server.local:1883"
PROJECT = "heron-sfl"
WHEEL_DIR = "wheels"
FORBIDDEN = ("torch",)  # a board never gets these (the device runtime is torch-free)
_NO_WHEEL = re.compile(r"No matching distribution found for ([A-Za-z0-9_.\-]+)")


class PackError(Exception):
    """The pack cannot be built as asked; the message says why and what to do."""


@dataclass(frozen=True)
class PackOptions:
    out: Path
    target: str = "linux-aarch64"
    python: str = "3.11"  # the board's Python, X.Y
    glibc: str = "2.28"  # the board's glibc, X.Y: the newest manylinux wheels accepted
    broker: str | None = None  # written into device.toml
    profile: str = "generic"  # written into device.toml
    source: Path | None = None  # heron checkout to build the wheel from


@dataclass(frozen=True)
class PackResult:
    out: Path
    wheels: tuple[str, ...]
    size_bytes: int
    own_wheel: str


def _version(text: str, what: str, example: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", text)
    if m is None:
        raise PackError(f"{what} {text!r} is not X.Y; help: e.g. {example}")
    return int(m.group(1)), int(m.group(2))


def platform_tags(arch: str, glibc: tuple[int, int]) -> list[str]:
    """Every manylinux tag a board with this glibc accepts (pip does not expand PEP 600 tags
    itself, so an explicit list it is)."""
    if glibc < (2, 17):
        raise PackError(f"glibc {glibc[0]}.{glibc[1]} is older than any manylinux wheel "
                        "(2.17); help: the board's OS is too old for binary wheels")
    return [f"manylinux2014_{arch}",
            *(f"manylinux_2_{minor}_{arch}" for minor in range(17, glibc[1] + 1))]


def target_tags(arch: str, python: tuple[int, int], glibc: tuple[int, int]) -> set[Tag]:
    """The wheel tags the board's CPython accepts, as pip on the board would rank them."""
    platforms = platform_tags(arch, glibc)
    return {*cpython_tags(python, abis=[f"cp{python[0]}{python[1]}"], platforms=platforms),
            *compatible_tags(python, f"cp{python[0]}{python[1]}", platforms)}


def board_environment(arch: str, python: tuple[int, int]) -> dict[str, str]:
    """PEP 508 marker values of the board, so markers are judged for it and not for us."""
    version = f"{python[0]}.{python[1]}"
    return {"python_version": version, "python_full_version": f"{version}.0",
            "platform_machine": arch, "platform_system": "Linux", "sys_platform": "linux",
            "os_name": "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "extra": ""}


def find_source(source: Path | None) -> Path:
    """The heron checkout whose wheel goes into the pack."""
    root = Path(source) if source else Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or f'name = "{PROJECT}"' not in pyproject.read_text():
        raise PackError(f"{root} is not a heron source checkout (no pyproject.toml naming "
                        f"{PROJECT}); help: run `heron devices pack` from a checkout "
                        "(`pip install -e .`) or pass --source DIR")
    return root


def _run(cmd: list[str], what: str, limit_s: float = 900.0,
         every_s: float = 5.0) -> subprocess.CompletedProcess[str]:
    """pip, quiet, with a line every `every_s` while it runs (a download can take minutes)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    while True:
        try:
            out, err = proc.communicate(timeout=every_s)
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        except subprocess.TimeoutExpired as exc:
            elapsed = time.monotonic() - t0
            if elapsed > limit_s:
                proc.kill()
                proc.communicate()
                raise PackError(f"{what} took more than {limit_s / 60:.0f} minutes; help: "
                                "check the connection to the package index") from exc
            print(f"heron devices pack: {what} ({elapsed:.0f} s)", flush=True)


def build_wheel(source: Path, dest: Path) -> Path:
    """`pip wheel --no-deps` of a clean copy of the checkout (no build/ litter in the tree)."""
    with tempfile.TemporaryDirectory(prefix="heron-wheel-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        for item in source.iterdir():
            if item.is_file() and (item.name == "pyproject.toml" or
                                   item.name.startswith(("README", "LICENSE"))):
                shutil.copy2(item, copy / item.name)
            elif item.is_dir() and (item / "__init__.py").is_file():
                shutil.copytree(item, copy / item.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        before = set(dest.glob("*.whl"))
        proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                     "--wheel-dir", str(dest), str(copy)], "building heron's wheel")
        if proc.returncode != 0:
            raise PackError(f"building heron's wheel failed:\n{proc.stderr[-2000:]}\nhelp: "
                            "`pip wheel --no-deps .` in the checkout shows the whole error")
    built = sorted(set(dest.glob("*.whl")) - before)
    if len(built) != 1:
        raise PackError(f"expected one wheel from `pip wheel`, got {[p.name for p in built]}")
    return built[0]


@dataclass(frozen=True)
class WheelMetadata:
    requires: tuple[Requirement, ...]  # Requires-Dist, extras' included
    requires_python: SpecifierSet | None
    version: str


def wheel_metadata(wheel: Path) -> WheelMetadata:
    """Requires-Dist, Requires-Python and Version from a wheel's METADATA."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            raw, _ = parse_email(zf.read(name))
        python = raw.get("requires_python")
        return WheelMetadata(tuple(Requirement(r) for r in raw.get("requires_dist", [])),
                             SpecifierSet(python) if python else None, raw.get("version", ""))
    except (OSError, StopIteration, zipfile.BadZipFile, InvalidRequirement,
            InvalidSpecifier) as exc:
        raise PackError(f"cannot read the metadata of {wheel.name}: {exc}; help: rebuild it "
                        "with `pip wheel --no-deps .`") from exc


def board_requirements(meta: WheelMetadata, arch: str, python: tuple[int, int]) -> list[str]:
    """The runtime requirements the board needs (no extras), markers judged for the board."""
    env = board_environment(arch, python)
    out = []
    for req in meta.requires:
        if req.marker is None or req.marker.evaluate(env):
            bare = Requirement(str(req))
            bare.marker = None  # pip would judge it for this machine, not the board
            out.append(str(bare))
    return out


def check_python(python: tuple[int, int], requires_python: SpecifierSet | None) -> None:
    if requires_python is not None and f"{python[0]}.{python[1]}" not in requires_python:
        raise PackError(f"heron needs Python {requires_python} (Requires-Python of its "
                        f"wheel) and the board's Python {python[0]}.{python[1]} cannot run it; "
                        f"help: install a Python {requires_python} on the board and pass its "
                        "version with --python")


def check_wheels(names: list[str], tags: set[Tag], where: str) -> None:
    """No forbidden project, and every wheel installable on the board."""
    for n in names:
        try:
            project, _, _, wheel_tags = parse_wheel_filename(n)
        except InvalidWheelFilename as exc:
            raise PackError(f"the pack would contain {n}, which is not a wheel: {exc}") from exc
        if project in FORBIDDEN:
            raise PackError(f"the pack would contain {n}; the device runtime must not need "
                            "it: check the dependencies in pyproject.toml")
        if not wheel_tags & tags:
            raise PackError(f"{n} does not install on {where}; help: remove it from the "
                            "pack's wheels/ or pick another --python or --glibc")


def download_wheels(requirements: list[str], target: str, python: tuple[int, int],
                    glibc: tuple[int, int], dest: Path) -> None:
    arch = TARGETS[target]
    py = f"{python[0]}{python[1]}"
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", f"{python[0]}.{python[1]}", "--implementation", "cp",
           "--abi", f"cp{py}", "--abi", "abi3", "--abi", "none"]
    for tag in platform_tags(arch, glibc):
        cmd += ["--platform", tag]
    proc = _run([*cmd, *requirements, "pip"], "downloading the dependencies' wheels")
    if proc.returncode == 0:
        return
    missing = _NO_WHEEL.search(proc.stderr)
    where = f"{target} / CPython {python[0]}.{python[1]} / glibc <= {glibc[0]}.{glibc[1]}"
    if missing is None:
        raise PackError(f"pip could not download the wheels for {where}:\n"
                        f"{proc.stderr[-2000:]}\nhelp: check the connection to the package "
                        "index")
    name = missing.group(1)
    hint = ("ONNX Runtime publishes no wheels for 32-bit ARM: put a 64-bit OS on the board "
            "and use --target linux-aarch64" if arch == "armv7l" and
            name.lower().startswith("onnxruntime") else
            "try another --python (the board's) or --glibc, or build that wheel for the "
            "board and put it into the pack's wheels/")
    raise PackError(f"{name} has no wheel for {where} on the package index, so the board "
                    f"could not install it offline; stopping. help: {hint}")


def _safe_out(out: Path) -> None:
    """Refuse to overwrite a directory that is not an earlier pack."""
    if out.exists() and any(out.iterdir()):
        if not (out / "pack.json").is_file():
            raise PackError(f"{out} exists and is not a heron pack; help: pass an empty or "
                            "new --out directory")
        shutil.rmtree(out)


def build_pack(opts: PackOptions) -> PackResult:
    if opts.target not in TARGETS:
        raise PackError(f"unknown target {opts.target!r}; help: one of {', '.join(TARGETS)}")
    python = _version(opts.python, "--python", "3.11")
    glibc = _version(opts.glibc, "--glibc", "2.28 (`ldd --version` on the board)")
    load_profile(opts.profile)  # a typo here would only show on the board
    source = find_source(opts.source)
    final = Path(opts.out)
    _safe_out(final)
    out = final.with_name(final.name + ".partial")  # renamed to `final` once complete
    shutil.rmtree(out, ignore_errors=True)
    try:
        _fill(opts, source, out, python, glibc)
        final.mkdir(parents=True, exist_ok=True)
        final.rmdir()
        out.rename(final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    names = tuple(sorted(p.name for p in (final / WHEEL_DIR).glob("*.whl")))
    own = json.loads((final / "pack.json").read_text())["own_wheel"]
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    return PackResult(final, names, size, own)


def _fill(opts: PackOptions, source: Path, out: Path, python: tuple[int, int],
          glibc: tuple[int, int]) -> None:
    wheels = out / WHEEL_DIR
    wheels.mkdir(parents=True)
    own = build_wheel(source, wheels)
    arch = TARGETS[opts.target]
    meta = wheel_metadata(own)
    version = meta.version
    check_python(python, meta.requires_python)
    requirements = board_requirements(meta, arch, python)
    download_wheels(requirements, opts.target, python, glibc, wheels)
    names = sorted(p.name for p in wheels.glob("*.whl"))
    check_wheels(names, target_tags(arch, python, glibc),
                 f"{opts.target} / CPython {python[0]}.{python[1]}")
    pyver = f"{python[0]}.{python[1]}"
    (out / "device.toml").write_text(device_toml(opts.broker or DEFAULT_BROKER, opts.profile))
    (out / "heron-device.service").write_text(SERVICE)
    install = out / "install.sh"
    install.write_text(INSTALL_SH.replace("@ARCH@", arch).replace("@PY@", pyver)
                       .replace("@VERSION@", version).replace("@PROJECT@", PROJECT))
    install.chmod(0o755)
    (out / "README.txt").write_text(README.replace("@TARGET@", opts.target)
                                    .replace("@PY@", pyver))
    manifest = {
        "project": PROJECT, "version": version, "own_wheel": own.name,
        "target": opts.target, "machine": arch,
        "python": pyver, "glibc": f"{glibc[0]}.{glibc[1]}", "profile": opts.profile,
        "requirements": requirements,
        "wheels": {n: hashlib.sha256((wheels / n).read_bytes()).hexdigest() for n in names},
    }
    (out / "pack.json").write_text(json.dumps(manifest, indent=2) + "\n")


def device_toml(broker: str, profile: str) -> str:
    if '"' in broker or "\\" in broker:
        raise PackError(f"broker URL {broker!r} may not contain quotes or backslashes")
    return DEVICE_TOML.replace("@BROKER@", broker).replace("@PROFILE@", profile)
