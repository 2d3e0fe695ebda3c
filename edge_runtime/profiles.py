"""Board profiles, the device config file, and the memory check a device runs before training.

Torch-free, like all of `edge_runtime/`: this runs on the board.

A *profile* is a flat TOML file, ``edge_runtime/boards/<name>.toml`` in the checkout and in the
installed wheel (package data), found by its file name; any other ``.toml`` path works too::

    description = "Raspberry Pi 4 Model B, 4 GB"
    memory_mb = 4096   # the board's RAM
    budget_mb = 3072   # the most the device process may hold (peak RSS)
    cores = 4
    threads = 4        # ONNX Runtime intra-op threads

The *memory check* is measured, not guessed: real ZO training steps (the same `train_round`
the rounds use, ONNX Runtime forwards included) at growing batch sizes 1, 2, 4, ... up to the
configured one, reading the process's peak RSS after each. It stops early, without running
the next step, when a straight line through the last two measurements already passes the
budget, so a board is refused before the kernel's OOM killer would have to act.

The *budget* is the profile's, capped at what this process holds now plus what is still
available to it: the host's available memory, or less in a cgroup with a memory limit (a
Docker container, a systemd unit with ``MemoryMax=``), whose limit is what the kernel kills
at. `cgroup_memory_limit` reads it (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, parents
included) and falls back to the host's figure when there is none or the files cannot be read.
The join-time check runs at the batch size the server announces in its presence (the
default, 32, when it announces none); each round's start checks its own batch again.

TOML is read with `tomllib` (Python 3.11+) or its backport `tomli` (Python 3.10).
"""

from __future__ import annotations

import importlib.resources
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from edge_runtime.protocol import topics

if TYPE_CHECKING:  # imported lazily: `heron --help` should not load ONNX Runtime
    from edge_runtime.protocol import TrainConfig
    from edge_runtime.runtime import LocalModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same module, a dependency on Python 3.10
    import tomli as tomllib

PROFILE_PACKAGE = "edge_runtime"  # board profiles ship as package data of the device runtime
PROFILE_DIR = "boards"
PROFILE_KEYS = {"description": str, "memory_mb": int, "budget_mb": int, "cores": int,
                "threads": int}
# `heron device --config FILE`: the keys mirror `heron device`'s long options.
DEVICE_CONFIG_KEYS = {"broker": str, "id": str, "data": str, "profile": str, "prefix": str,
                      "bundle": str, "threads": int, "username": str, "password": str,
                      "credentials": str, "ca_file": str, "cert_file": str, "key_file": str}
MAX_THREADS = 1024  # ONNX Runtime intra-op threads a config may ask for
MEMORY_EXIT_CODE = 5  # `heron device` exit status when the bundle does not fit the budget


class ProfileError(ValueError):
    """A profile or device config file is missing, malformed or inconsistent."""


# -- TOML -----------------------------------------------------------------------------------
def parse_toml(text: str, source: str = "<toml>") -> dict[str, Any]:
    """The file's keys, or a `ProfileError` naming the file and the line that is wrong."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source} is not valid TOML: {exc}; help: heron's TOML files are "
                           "flat `key = value` lines with quoted strings") from exc


def _typed(obj: dict[str, Any], schema: dict[str, type], source: str, what: str) -> None:
    unknown = sorted(set(obj) - set(schema))
    if unknown:
        raise ProfileError(f"{source}: unknown {what} key(s) {unknown}; known: "
                           f"{sorted(schema)}")
    for key, value in obj.items():
        want = schema[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ProfileError(f"{source}: {key} = {value!r} should be a {want.__name__}")


# -- profiles -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    memory_mb: int
    budget_mb: int
    cores: int
    threads: int
    source: str

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "budget_mb": self.budget_mb, "memory_mb": self.memory_mb,
                "cores": self.cores, "threads": self.threads}


def _profile_dir() -> Any:
    return importlib.resources.files(PROFILE_PACKAGE).joinpath(PROFILE_DIR)


def profile_names() -> list[str]:
    """Names of the profiles shipped with heron (file names without .toml)."""
    return sorted(p.name[:-5] for p in _profile_dir().iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (`rpi4`) or any profile file by path (`./my-board.toml`)."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        return profile_from_toml(path.stem, path.read_text(), str(path))
    resource = _profile_dir().joinpath(f"{name_or_path}.toml")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name_or_path) or not resource.is_file():
        raise ProfileError(f"no board profile named {name_or_path!r}; help: pick one of "
                           f"{', '.join(profile_names())} or give a path to a .toml file")
    return profile_from_toml(name_or_path, resource.read_text(), f"profile {name_or_path}")


def profile_from_toml(name: str, text: str, source: str) -> Profile:
    obj = parse_toml(text, source)
    _typed(obj, PROFILE_KEYS, source, "profile")
    missing = sorted(set(PROFILE_KEYS) - set(obj))
    if missing:
        raise ProfileError(f"{source}: missing key(s) {missing}")
    for key in ("memory_mb", "budget_mb", "cores", "threads"):
        if obj[key] < 1:
            raise ProfileError(f"{source}: {key} must be >= 1, got {obj[key]}")
    if obj["budget_mb"] > obj["memory_mb"]:
        raise ProfileError(f"{source}: budget_mb {obj['budget_mb']} is more than the board's "
                           f"memory_mb {obj['memory_mb']}")
    if obj["threads"] > obj["cores"]:
        raise ProfileError(f"{source}: threads {obj['threads']} > cores {obj['cores']}")
    return Profile(name=name, source=source, **obj)


# -- device config file ---------------------------------------------------------------------
def load_device_config(path: str | Path) -> dict[str, Any]:
    """`heron device --config FILE`: flat TOML whose keys are `heron device`'s options."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"cannot read device config {path}: {exc}; help: `heron devices "
                           "pack` writes one (device.toml), install.sh puts it in "
                           "/etc/heron/") from exc
    obj = parse_toml(text, str(path))
    _typed(obj, DEVICE_CONFIG_KEYS, str(path), "device config")
    # as on the command line: threads >= 1 (and no absurd count), ids and prefix topic levels
    if "threads" in obj and not 1 <= obj["threads"] <= MAX_THREADS:
        raise ProfileError(f"{path}: threads = {obj['threads']} must be 1..{MAX_THREADS}")
    for key, check in (("id", topics.validate_id), ("prefix", topics.validate_prefix)):
        if key in obj:
            try:
                check(obj[key])
            except ValueError as exc:
                raise ProfileError(f"{path}: {exc}") from exc
    return obj


# -- the memory check -----------------------------------------------------------------------
CGROUP_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number (2**63 - one page)


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit of the cgroups this process is in (its own or a parent's)."""

    limit: int  # bytes
    usage: int  # bytes charged to that cgroup now, less the reclaimable inactive file cache
    file: str  # memory.max (cgroup v2) or memory.limit_in_bytes (cgroup v1)

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.usage)


def _read_int(path: Path) -> int | None:
    """A cgroup file's number; None for "max", a missing or unreadable file, or garbage."""
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if text == "max" or not re.fullmatch(r"[0-9]+", text):
        return None
    value = int(text)
    return None if value >= CGROUP_UNLIMITED else value


def _inactive_file(path: Path, key: str) -> int:
    """Page cache the kernel drops before it OOM-kills (as `docker stats` and kubelet count)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError):
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _cgroup_levels(base: Path, rel: str) -> list[Path]:
    """`base/rel` and each parent up to `base`: a parent's limit applies to its children. A
    container usually sees its own cgroup mounted as `base`, so paths that do not exist there
    are walked past."""
    parts = [p for p in rel.strip().split("/") if p]
    if any(p in (".", "..") for p in parts):
        return []
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_memory_limit(proc_root: str | Path = "/proc",
                        cgroup_root: str | Path = "/sys/fs/cgroup") -> CgroupMemory | None:
    """The memory limit the kernel kills this process at, if a cgroup sets one (Docker,
    systemd's MemoryMax=); None if none does or nothing can be read.

    cgroup v2: ``0::/path`` in ``/proc/self/cgroup``, ``memory.max`` ("max": no limit) and
    ``memory.current``; cgroup v1: the ``memory`` line, ``memory/…/memory.limit_in_bytes`` and
    ``memory.usage_in_bytes``. Of every level with a limit, the one with the least room left
    wins. Never raises: a board whose cgroup files look odd falls back to the host's figure."""
    try:
        lines = (Path(proc_root) / "self" / "cgroup").read_text().splitlines()
    except (OSError, ValueError):
        return None
    root = Path(cgroup_root)
    layouts = []  # (directories, limit file, usage file, inactive-file key in memory.stat)
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, rel = fields
        if hierarchy == "0" and controllers == "":
            layouts.append((_cgroup_levels(root, rel), "memory.max", "memory.current",
                            "inactive_file"))
        elif "memory" in controllers.split(","):
            layouts.append((_cgroup_levels(root / "memory", rel), "memory.limit_in_bytes",
                            "memory.usage_in_bytes", "total_inactive_file"))
    best: CgroupMemory | None = None
    for levels, limit_file, usage_file, inactive_key in layouts:
        for level in levels:
            limit = _read_int(level / limit_file)
            usage = _read_int(level / usage_file)
            if limit is None or usage is None:
                continue
            usage = max(0, usage - _inactive_file(level / "memory.stat", inactive_key))
            found = CgroupMemory(limit, usage, limit_file)
            if best is None or found.headroom < best.headroom:
                best = found
    return best


def memory_budget(profile: Profile | None, *, proc_root: str | Path = "/proc",
                  cgroup_root: str | Path = "/sys/fs/cgroup") -> tuple[float, str]:
    """The budget in MB and where it comes from: the profile's, but never more than this
    process holds now plus what is still available to it, the OS's figure or, in a cgroup
    with a memory limit (a container, a systemd unit), the room left under that limit."""
    rss = psutil.Process().memory_info().rss
    available = (rss + psutil.virtual_memory().available) / 2**20
    where, notes = "the memory available on this machine", []
    cgroup = cgroup_memory_limit(proc_root, cgroup_root)
    if cgroup is not None and (rss + cgroup.headroom) / 2**20 < available:
        available = (rss + cgroup.headroom) / 2**20
        where = "the cgroup memory limit of this process"
        notes.append(f"{cgroup.file} {cgroup.limit / 2**20:.0f} MB")
    if profile is not None and profile.budget_mb <= available:
        return float(profile.budget_mb), f"the {profile.name} profile's budget"
    notes.append(f"less than the {profile.name} profile's {profile.budget_mb} MB"
                 if profile is not None else "no --profile given")
    return available, f"{where} ({'; '.join(notes)})"


def probe_batches(batch: int) -> list[int]:
    """1, 2, 4, ... below `batch`, then `batch` itself."""
    out, b = [], 1
    while b < batch:
        out.append(b)
        b *= 2
    return [*out, batch]


@dataclass(frozen=True)
class MemoryVerdict:
    """The outcome of a memory check at one batch size."""

    batch: int  # the batch size checked (the configured one, capped at the shard size)
    budget_mb: float
    budget_source: str
    measured: dict[int, float]  # batch -> process peak RSS (MB) after a real step there
    fits: bool
    needed_mb: float  # measured at `batch`, or extrapolated if the check stopped early
    extrapolated: bool
    profile: str = "none"

    @property
    def largest_fitting(self) -> int | None:
        ok = [b for b, mb in self.measured.items() if mb <= self.budget_mb]
        return max(ok) if ok else None

    def message(self) -> str:
        budget = f"{self.budget_source} of {self.budget_mb:.0f} MB"
        bigger = ("help: use an earlier cut (a smaller device part), a smaller model, or a "
                  "board (--profile) with a larger memory budget")
        if not self.measured:
            return (f"the device process already holds {self.needed_mb:.0f} MB before any "
                    f"training step, over {budget}; {bigger}")
        how = "would need about" if self.extrapolated else "measured"
        head = (f"batch size {self.batch}: {how} {self.needed_mb:.0f} MB peak RSS, "
                f"{'within' if self.fits else 'over'} {budget}")
        if self.fits:
            return head
        best = self.largest_fitting
        if best is None:
            return (f"{head}; even batch size 1 does not fit (measured "
                    f"{min(self.measured.values()):.0f} MB); {bigger}")
        return (f"{head}; batch size {best} fits (measured {self.measured[best]:.0f} MB); "
                f"help: run the server with --batch-size {best} or smaller, or give this "
                "device a profile with a larger budget")


def check_memory(
    measure: Callable[[int], float],
    batch: int,
    budget_mb: float,
    budget_source: str,
    *,
    known: dict[int, float] | None = None,
    current_mb: float = 0.0,
    profile: str = "none",
) -> MemoryVerdict:
    """Probe batches 1, 2, 4, ... `batch` with `measure(b)` (a real step, returning the
    process's peak RSS in MB), stopping before a step a linear extrapolation says would
    pass the budget. `known` holds earlier measurements in this process and is updated."""
    known = {} if known is None else known
    done = dict(sorted(known.items()))

    def verdict(fits: bool, needed: float, extrapolated: bool) -> MemoryVerdict:
        return MemoryVerdict(batch, budget_mb, budget_source, dict(sorted(done.items())),
                             fits, needed, extrapolated, profile)

    if current_mb > budget_mb:  # already over before any step
        return verdict(False, current_mb, False)
    for b in probe_batches(batch):
        if b in done:
            if done[b] > budget_mb:
                return verdict(False, done[b], False)
            continue
        below = sorted(k for k in done if k < b)
        if len(below) >= 2:
            (b0, m0), (b1, m1) = [(k, done[k]) for k in below[-2:]]
            slope = max(0.0, (m1 - m0) / (b1 - b0))  # MB per sample
            if m1 + slope * (b - b1) > budget_mb:  # the next probe would already be over
                return verdict(False, m1 + slope * (batch - b1), True)
        mb = float(measure(b))
        if not math.isfinite(mb) or mb <= 0:
            raise ValueError(f"memory measurement at batch {b} returned {mb}")
        done[b] = mb
        known[b] = mb
        if mb > budget_mb:
            return verdict(False, mb, False)
    return verdict(True, done[batch], False)


def dry_run_step(model: LocalModel, theta: np.ndarray, x: np.ndarray, y: np.ndarray,
                 batch: int, cfg: TrainConfig | None = None) -> float:
    """One real training step at `batch` (ONNX Runtime forwards at θ and θ+μu, smashed
    output included and coded for the wire on the uplink thread under the run's codec, as
    the device does, then dropped; optimizer update); returns the process's peak RSS in MB
    afterwards. On a heron-tail bundle the step is the tail graph's at its fixed batch
    whatever `batch` (its shapes are static), so every probe measures the step the device
    will make."""
    from edge_runtime.protocol import Smashed, TrainConfig
    from edge_runtime.runtime import peak_rss_mb, train_round
    from edge_runtime.transport import payloads
    from edge_runtime.uplink import Uplink

    base = cfg if cfg is not None else TrainConfig()
    step_cfg = TrainConfig(local_steps=1, upload_every=1, batch_size=batch, seed=base.seed,
                           zo=base.zo, optimizer=base.optimizer)
    tail = model.bundle.manifest.tail
    if tail is not None:  # a heron-tail bundle: its one step, at the graph's fixed batch
        step_cfg = TrainConfig(algorithm="heron-tail", local_steps=1, upload_every=1,
                               batch_size=tail.batch, seed=base.seed, optimizer=base.optimizer)

    def wire(step: int, act: np.ndarray, labels: np.ndarray) -> None:  # then sent nowhere
        payloads(Smashed.coded("0" * 32, 0, "dry-run", step, act, labels, base.smashed_codec))

    with Uplink(wire) as uplink:
        train_round(model, np.asarray(theta, dtype=np.float32), x, y, step_cfg, round_idx=0,
                    device_id="dry-run", on_smashed=uplink.send)
        uplink.flush()
    return peak_rss_mb()


def check_bundle_memory(model: LocalModel, theta: np.ndarray, x: np.ndarray, y: np.ndarray,
                        batch: int, profile: Profile | None, *,
                        known: dict[int, float] | None = None,
                        cfg: TrainConfig | None = None) -> MemoryVerdict:
    """The device's check: real dry-run steps on its own shard at batch sizes up to `batch`
    (capped at the shard size, as training caps it), against the profile's budget."""
    from edge_runtime.runtime import rss_mb

    budget, source = memory_budget(profile)
    return check_memory(lambda b: dry_run_step(model, theta, x, y, b, cfg),
                        min(batch, len(y)), budget, source, known=known, current_mb=rss_mb(),
                        profile=profile.name if profile else "none")
