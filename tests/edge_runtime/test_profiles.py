"""Board profiles, the device config file, and the memory check a device runs before training:
the check's logic on a known memory curve, then real dry runs and real refusals over a broker."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ROOT, heron

from devices.pack import DEVICE_TOML
from edge_runtime.profiles import (
    DEVICE_CONFIG_KEYS,
    MemoryVerdict,
    ProfileError,
    cgroup_memory_limit,
    check_memory,
    load_device_config,
    load_profile,
    memory_budget,
    probe_batches,
    profile_names,
)

SHIPPED = ["generic", "jetson-nano", "rpi-zero-2w", "rpi4"]
PROFILE_DIR = ROOT / "edge_runtime" / "boards"


def _profile_file(tmp_path: Path, budget_mb: int, name: str = "board") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'description = "test board"\nmemory_mb = {max(budget_mb, 1024)}\n'
                    f"budget_mb = {budget_mb}\ncores = 2\nthreads = 1\n")
    return path


# -- profiles and TOML ------------------------------------------------------------------------
def test_shipped_profiles_are_found_by_file_name() -> None:
    assert profile_names() == SHIPPED
    for name in SHIPPED:
        p = load_profile(name)
        assert p.name == name and p.description
        assert 1 <= p.budget_mb <= p.memory_mb and 1 <= p.threads <= p.cores
    assert load_profile("rpi-zero-2w").memory_mb == 512
    assert load_profile("rpi4").memory_mb == load_profile("jetson-nano").memory_mb == 4096


def test_a_profile_file_by_path(tmp_path: Path) -> None:
    p = load_profile(str(_profile_file(tmp_path, 300, "my-board")))
    assert (p.name, p.budget_mb, p.threads) == ("my-board", 300, 1)


@pytest.mark.parametrize("text, error", [
    ('description = "x"\nmemory_mb = 512\nbudget_mb = 256\ncores = 4\n', "missing key"),
    ('description = "x"\nmemory_mb = 512\nbudget_mb = 600\ncores = 4\nthreads = 4\n',
     "more than the board's memory_mb"),
    ('description = "x"\nmemory_mb = 512\nbudget_mb = 256\ncores = 4\nthreads = true\n',
     "should be a int"),
    ('description = "x"\nmemory_mb = 512\nbudget_mb = 256\ncores = 4\nthreads = 4\nram = 1\n',
     "unknown profile key"),
    ('description = "x"\nmemory_mb = 512\nbudget_mb = 256\ncores = 2\nthreads = 4\n',
     "threads 4 > cores 2"),
])
def test_bad_profiles_are_refused(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=error):
        load_profile(str(path))


def test_unknown_profile_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ProfileError) as exc:
        load_profile("rpi5")
    assert "help:" in str(exc.value) and all(n in str(exc.value) for n in SHIPPED)
    with pytest.raises(ProfileError, match="no board profile"):
        load_profile("../pyproject")


def test_every_shipped_profile_file_is_in_the_profile_dir() -> None:
    assert sorted(p.stem for p in PROFILE_DIR.glob("*.toml")) == SHIPPED


@pytest.mark.parametrize("text, error", [
    ('description = "x\nmemory_mb = 512\n', r"bad\.toml is not valid TOML: .*line 1"),
    ("memory_mb = 1\nmemory_mb = 2\n", r"bad\.toml is not valid TOML: .*line 2"),
    ("memory_mb = [1, 2]\n", r"bad\.toml: memory_mb = \[1, 2\] should be a int"),
    ("[board]\nmemory_mb = 1\n", r"bad\.toml: unknown profile key\(s\) \['board'\]"),
])
def test_malformed_toml_is_refused_naming_the_file_and_the_problem(
        tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=error):
        load_profile(str(path))
    with pytest.raises(ProfileError, match=r"bad\.toml"):
        load_device_config(path)


def test_device_config_file(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text(DEVICE_TOML.replace("@BROKER@", "mqtt://h:1883").replace("@PROFILE@", "rpi4"))
    cfg = load_device_config(path)
    assert cfg == {"broker": "mqtt://h:1883", "id": "board-0", "data": "/var/lib/heron/shard.npz",
                   "profile": "rpi4", "prefix": "heron"}
    assert set(cfg) <= set(DEVICE_CONFIG_KEYS)
    path.write_text('broker = "mqtt://h"\nbatch_size = 8\n')
    with pytest.raises(ProfileError, match=r"unknown device config key\(s\) \['batch_size'\]"):
        load_device_config(path)
    with pytest.raises(ProfileError, match="help:"):
        load_device_config(tmp_path / "missing.toml")


# -- the check's logic on a known curve ------------------------------------------------------
def _curve(base: float, per_sample: float, log: list[int]) -> Callable[[int], float]:
    def measure(batch: int) -> float:
        log.append(batch)
        return base + per_sample * batch
    return measure


def test_probe_batches() -> None:
    assert probe_batches(1) == [1]
    assert probe_batches(32) == [1, 2, 4, 8, 16, 32]
    assert probe_batches(48) == [1, 2, 4, 8, 16, 32, 48]


def test_fits_measures_every_rung_once() -> None:
    log: list[int] = []
    known: dict[int, float] = {}
    v = check_memory(_curve(100, 2, log), 32, 1000, "the test budget", known=known)
    assert v.fits and not v.extrapolated and v.needed_mb == 164 and v.largest_fitting == 32
    assert log == [1, 2, 4, 8, 16, 32]
    again = check_memory(_curve(100, 2, log), 16, 1000, "the test budget", known=known)
    assert again.fits and log == [1, 2, 4, 8, 16, 32]  # nothing measured twice
    assert "within the test budget" in again.message()


def test_stops_before_a_step_that_would_not_fit_and_names_what_fits() -> None:
    log: list[int] = []
    v = check_memory(_curve(100, 2, log), 64, 150, "the rpi-zero-2w profile's budget",
                     profile="rpi-zero-2w")
    assert log == [1, 2, 4, 8, 16]  # 32 (predicted 164 MB) was never run
    assert not v.fits and v.extrapolated and v.largest_fitting == 16
    assert v.needed_mb == pytest.approx(100 + 2 * 64)
    msg = v.message()
    assert "batch size 16 fits" in msg and "--batch-size 16" in msg and "help:" in msg
    assert "would need about 228 MB" in msg and "rpi-zero-2w" in msg
    assert v.profile == "rpi-zero-2w"  # what the device's join profile names


def test_nothing_fits() -> None:
    log: list[int] = []
    v = check_memory(_curve(100, 2, log), 32, 50, "budget")
    assert log == [1] and not v.fits and v.largest_fitting is None
    assert "even batch size 1 does not fit" in v.message() and "help:" in v.message()
    before = check_memory(_curve(100, 2, log), 32, 50, "budget", current_mb=80)
    assert log == [1] and not before.fits and "before any training step" in before.message()


def test_a_measured_step_over_the_budget_is_refused_even_if_predicted_to_fit() -> None:
    """A jump the straight line did not see (e.g. an allocator doubling) is still caught."""
    table = {1: 100.0, 2: 101.0, 4: 102.0, 8: 400.0}
    v = check_memory(lambda b: table[b], 8, 300, "budget")
    assert not v.fits and not v.extrapolated and v.needed_mb == 400 and v.largest_fitting == 4
    assert isinstance(v, MemoryVerdict)


# -- the budget: host memory and cgroup limits ------------------------------------------------
MB = 2**20
V1_UNLIMITED = "9223372036854771712"


def _cgroup_tree(tmp_path: Path, cgroup: str,
                 files: dict[str, str | bytes]) -> tuple[Path, Path]:
    """A fake /proc (self/cgroup holds `cgroup`) and /sys/fs/cgroup (`files`: path -> text)."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        data = text if isinstance(text, bytes) else text.encode()
        (root / rel).write_bytes(data)
    return proc, root


def test_cgroup_v2_without_a_limit(tmp_path: Path) -> None:
    proc, root = _cgroup_tree(tmp_path, "0::/user.slice/heron.service\n", {
        "user.slice/heron.service/memory.max": "max\n",
        "user.slice/heron.service/memory.current": f"{50 * MB}\n",
        "user.slice/memory.max": "max\n", "user.slice/memory.current": f"{900 * MB}\n"})
    assert cgroup_memory_limit(proc, root) is None


def test_cgroup_v2_limit_and_the_budget_it_gives(tmp_path: Path) -> None:
    proc, root = _cgroup_tree(tmp_path, "0::/system.slice/heron-device.service\n", {
        "system.slice/heron-device.service/memory.max": f"{512 * MB}\n",
        "system.slice/heron-device.service/memory.current": f"{112 * MB}\n",
        "system.slice/heron-device.service/memory.stat": f"anon 1\ninactive_file {12 * MB}\n"})
    limit = cgroup_memory_limit(proc, root)
    assert limit is not None and limit.file == "memory.max"
    assert (limit.limit, limit.usage, limit.headroom) == (512 * MB, 100 * MB, 412 * MB)
    budget, source = memory_budget(None, proc_root=proc, cgroup_root=root)
    rss = psutil.Process().memory_info().rss / MB  # the budget is our RSS + the room left
    assert budget == pytest.approx(rss + 412, abs=64)  # RSS moves a little between reads
    assert source == ("the cgroup memory limit of this process (memory.max 512 MB; "
                      "no --profile given)")
    budget, source = memory_budget(load_profile("rpi4"), proc_root=proc, cgroup_root=root)
    assert budget < 3072 and "less than the rpi4 profile's 3072 MB" in source
    assert "memory.max 512 MB" in source


def test_cgroup_v2_parent_limit_smaller_than_the_child_wins(tmp_path: Path) -> None:
    proc, root = _cgroup_tree(tmp_path, "0::/pod/heron\n", {
        "pod/heron/memory.max": f"{1024 * MB}\n", "pod/heron/memory.current": f"{100 * MB}\n",
        "pod/memory.max": f"{300 * MB}\n", "pod/memory.current": f"{200 * MB}\n"})
    limit = cgroup_memory_limit(proc, root)
    assert limit is not None and (limit.limit, limit.headroom) == (300 * MB, 100 * MB)


def test_cgroup_v2_in_a_namespace_sees_its_own_cgroup_as_the_root(tmp_path: Path) -> None:
    """Docker with a cgroup namespace: /proc/self/cgroup says 0::/ and the container's own
    memory.max is at the top of /sys/fs/cgroup."""
    proc, root = _cgroup_tree(tmp_path, "0::/\n", {"memory.max": f"{256 * MB}\n",
                                                    "memory.current": f"{56 * MB}\n"})
    limit = cgroup_memory_limit(proc, root)
    assert limit is not None and limit.headroom == 200 * MB


def test_cgroup_v1_limit_with_an_unlimited_parent(tmp_path: Path) -> None:
    cgroup = "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n"
    proc, root = _cgroup_tree(tmp_path, cgroup, {
        "memory/docker/abc/memory.limit_in_bytes": f"{768 * MB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{300 * MB}\n",
        "memory/docker/abc/memory.stat": f"inactive_file {9 * MB}\ntotal_inactive_file {40 * MB}\n",
        "memory/docker/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/docker/memory.usage_in_bytes": f"{2000 * MB}\n",
        "memory/memory.limit_in_bytes": V1_UNLIMITED, "memory/memory.usage_in_bytes": "1\n"})
    limit = cgroup_memory_limit(proc, root)
    assert limit is not None and limit.file == "memory.limit_in_bytes"
    assert (limit.limit, limit.usage) == (768 * MB, 260 * MB)  # less the inactive file cache
    _, source = memory_budget(None, proc_root=proc, cgroup_root=root)
    assert "memory.limit_in_bytes 768 MB" in source


def test_cgroup_v1_without_a_limit(tmp_path: Path) -> None:
    proc, root = _cgroup_tree(tmp_path, "4:memory:/user.slice\n", {
        "memory/user.slice/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/user.slice/memory.usage_in_bytes": f"{300 * MB}\n"})
    assert cgroup_memory_limit(proc, root) is None


@pytest.mark.parametrize("cgroup, files", [
    (None, {}),  # no /proc/self/cgroup (not Linux, or /proc not mounted)
    ("0::/a\n", {}),  # no cgroup files at all
    ("0::/a\n", {"a/memory.max": f"{512 * MB}\n"}),  # a limit but no usage
    ("0::/a\n", {"a/memory.max": "lots\n", "a/memory.current": "1\n"}),
    ("0::/a\n", {"a/memory.max": "-5\n", "a/memory.current": "1\n"}),
    ("0::/a\n", {"a/memory.max": b"\xff\xfe1", "a/memory.current": "1\n"}),
    ("0::/../../etc\n", {"memory.max": f"{512 * MB}\n"}),
    ("garbage without colons\n\x00\n", {"memory.max": f"{512 * MB}\n"}),
    ("4:memory:/x\n", {"memory/x/memory.limit_in_bytes": "", "memory/x/memory.usage_in_bytes": ""}),
])
def test_cgroup_files_missing_or_garbage_fall_back_to_the_host(
        tmp_path: Path, cgroup: str | None, files: dict[str, str | bytes]) -> None:
    proc, root = _cgroup_tree(tmp_path, cgroup or "", files)
    if cgroup is None:
        (proc / "self" / "cgroup").unlink()
    assert cgroup_memory_limit(proc, root) is None
    budget, source = memory_budget(None, proc_root=proc, cgroup_root=root)
    assert budget > 0 and source == "the memory available on this machine (no --profile given)"


def test_unreadable_cgroup_file_falls_back_to_the_host(tmp_path: Path) -> None:
    proc, root = _cgroup_tree(tmp_path, "0::/a\n", {"a/memory.current": "1\n"})
    (root / "a" / "memory.max").mkdir()  # reading it raises IsADirectoryError
    assert cgroup_memory_limit(proc, root) is None
    assert memory_budget(None, proc_root=proc, cgroup_root=root)[0] > 0


def test_memory_budget_on_this_machine_is_positive_and_finite() -> None:
    budget, source = memory_budget(None)
    assert math.isfinite(budget) and budget > 0 and source


# -- real dry runs ---------------------------------------------------------------------------
def _dry_run(bundle: Path, shard: Path, profile: Path, batch: int,
             env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[int, float]]:
    proc = subprocess.run(heron("device", "--dry-run", "--bundle", str(bundle), "--data",
                                str(shard), "--profile", str(profile), "--threads", "1",
                                "--batch-size", str(batch)),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    measured = {int(b): float(mb) for b, mb in
                re.findall(r"batch\s+(\d+): peak RSS\s+([\d.]+) MB", proc.stdout)}
    return proc, measured


@pytest.fixture(scope="module")
def resnet_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A resnet18 stem+layer1 bundle (memory grows with the batch) and a 3x32x32 dataset."""
    tmp = tmp_path_factory.mktemp("resnet")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((160, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 160)
    np.savez(tmp / "data.npz", x_train=x[:128], y_train=y[:128], x_test=x[128:], y_test=y[128:])
    np.savez(tmp / "shard.npz", x=x[:128], y=y[:128])
    subprocess.run(heron("export", "--model", "resnet18", "--cut", "layer1", "--input-shape",
                         "3,32,32", "--out", str(tmp / "bundle")),
                   cwd=ROOT, check=True, capture_output=True, timeout=180)
    return tmp, tmp / "bundle"


@pytest.mark.slow
def test_dry_run_measures_real_steps_without_torch(resnet_case: tuple[Path, Path],
                                                   tmp_path: Path, no_torch_env: dict) -> None:
    tmp, bundle = resnet_case
    roomy = _profile_file(tmp_path, 20000, "roomy")
    proc, measured = _dry_run(bundle, tmp / "shard.npz", roomy, 64, no_torch_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(measured) == [1, 2, 4, 8, 16, 32, 64] and "fits: batch size 64" in proc.stdout
    assert measured[64] > measured[1]  # activations grow with the batch


@pytest.mark.slow
@pytest.mark.broker
def test_round_with_a_batch_over_budget_is_refused_and_the_server_records_the_profile(
        resnet_case: tuple[Path, Path], tmp_path: Path, mosquitto: str) -> None:
    """Join: checked at the run's batch 64, which the server announces; over the budget, but
    batch 32 fits, so the device joins. Round 1 asks for batch 64: the device refuses before
    training, names the batch that fits, tells the server, exits 5."""
    tmp, bundle = resnet_case
    _, measured = _dry_run(bundle, tmp / "shard.npz", _profile_file(tmp_path, 20000, "roomy"),
                           64, dict(os.environ))
    assert measured[64] - measured[32] > 20, measured  # room for a budget in between
    budget = int((measured[32] + measured[64]) / 2)
    small = _profile_file(tmp_path, budget, "small-board")
    out = tmp_path / "run"
    server = subprocess.Popen(heron("server", "--broker", mosquitto, "--out", str(out),
                                    "--dataset", "npz", "--data-dir", str(tmp / "data.npz"),
                                    "--model", "resnet18", "--cut", "layer1", "--devices", "1",
                                    "--rounds", "1", "--batch-size", "64", "--local-steps", "2"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dev = subprocess.run(heron("device", "--broker", mosquitto, "--id", "small-0", "--data",
                               str(tmp / "shard.npz"), "--profile", str(small), "--threads", "1"),
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    _, stderr = server.communicate(timeout=120)
    assert server.returncode == 0, stderr[-3000:]
    assert dev.returncode == 5, dev.stderr[-3000:]
    assert "round 1 refused: batch size 64" in dev.stderr and "batch size 32 fits" in dev.stderr
    assert "device small-0 reports: round 1 refused" in stderr and "--batch-size 32" in stderr
    summary = json.loads((out / "summary.json").read_text())
    prof = summary["device_profiles"]["small-0"]
    assert prof["profile"] == "small-board" and prof["budget_mb"] == budget
    assert prof["memory_batch"] == 64 and prof["memory_mb"] > budget
    assert prof["max_batch_measured_fit"] == 32
    assert prof["machine"] and prof["samples"] == 128
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["updates"] == [] and record["device_memory_mb"] == {"small-0": prof["memory_mb"]}


@pytest.mark.slow
@pytest.mark.broker
def test_bundle_that_fits_no_batch_is_refused_at_join(tmp_path: Path, mosquitto: str) -> None:
    shards = tmp_path / "shards"
    subprocess.run(heron("devices", "partition", "--devices", "2", "--out", str(shards)),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    out = tmp_path / "run"
    server = subprocess.Popen(heron("server", "--broker", mosquitto, "--out", str(out),
                                    "--devices", "1", "--rounds", "1", "--local-steps", "5"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tiny = _profile_file(tmp_path, 8, "tiny")  # less than any Python process holds
    refused = subprocess.run(heron("device", "--broker", mosquitto, "--id", "tiny-0", "--data",
                                   str(shards / "dev-0.npz"), "--profile", str(tiny)),
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 5, refused.stderr[-2000:]
    assert "bundle refused: the device process already holds" in refused.stderr
    ok = subprocess.run(heron("device", "--broker", mosquitto, "--id", "dev-1", "--data",
                              str(shards / "dev-1.npz"), "--profile", "generic"),
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr[-2000:]
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "device tiny-0 reports: bundle refused" in stderr and "help:" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["device_profiles"]) == ["dev-1"]  # the refused one never got ready
    assert summary["device_profiles"]["dev-1"]["profile"] == "generic"
    assert summary["device_profiles"]["dev-1"]["memory_batch"] == 32  # the server's default


@pytest.mark.slow
@pytest.mark.broker
def test_join_check_runs_at_the_batch_size_the_server_announces(tmp_path: Path,
                                                                mosquitto: str) -> None:
    """The server's presence carries the run's training config, so the device measures at the
    run's batch size before round 1 says it, not at the default 32 (a higher peak RSS than the
    run ever needs)."""
    shards = tmp_path / "shards"
    subprocess.run(heron("devices", "partition", "--devices", "1", "--out", str(shards)),
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    out = tmp_path / "run"
    server = subprocess.Popen(heron("server", "--broker", mosquitto, "--out", str(out),
                                    "--devices", "1", "--rounds", "1", "--local-steps", "2",
                                    "--batch-size", "8"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dev = subprocess.run(heron("device", "--broker", mosquitto, "--id", "dev-0", "--data",
                               str(shards / "dev-0.npz"), "--profile", "generic"),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr[-2000:]
    assert dev.returncode == 0, dev.stderr[-2000:]
    assert "memory check: batch size 8: measured" in dev.stderr
    assert "batch size 32" not in dev.stderr
    prof = json.loads((out / "summary.json").read_text())["device_profiles"]["dev-0"]
    assert prof["memory_batch"] == 8 and prof["max_batch_measured_fit"] == 8


def test_cli_config_file_and_flags(tmp_path: Path) -> None:
    """`heron device --config`: the file fills what the flags leave out; flags win."""
    cfg = tmp_path / "device.toml"
    cfg.write_text('broker = "mqtt://127.0.0.1:1"\nid = "from-file"\nprofile = "nope"\n')
    proc = subprocess.run(heron("device", "--config", str(cfg), "--data", "x.npz"), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no board profile named 'nope'" in proc.stderr
    proc = subprocess.run(heron("device", "--config", str(cfg), "--profile", "rpi4"), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "missing --data" in proc.stderr and "help:" in proc.stderr


def test_profiles_load_with_the_device_install_only(no_torch_env: dict) -> None:
    """The loader lives in the torch-free core and reads package data, pulling in nothing
    from the server side (no torch, no scikit-learn, not even ONNX Runtime)."""
    code = ("import sys; from edge_runtime.profiles import load_profile, profile_names; "
            "print([load_profile(n).budget_mb for n in profile_names()]); "
            "print(sorted(m for m in ('torch', 'sklearn', 'onnxruntime', 'heron_data.datasets') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=no_torch_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[1024, 2560, 256, 3072]", "[]"]


@pytest.mark.parametrize("line, error", [
    ("threads = 0", r"threads = 0 must be 1\.\.1024"),
    ("threads = -3", r"threads = -3 must be 1\.\.1024"),
    ("threads = 100000", r"threads = 100000 must be 1\.\.1024"),
    ('id = "a/b"', r"device id 'a/b' is not allowed"),
    ('id = "dev+1"', r"device id 'dev\+1' is not allowed"),
    ('prefix = "fleet/#"', r"topic prefix 'fleet/#' must be"),
    ('prefix = ""', r"topic prefix '' must be"),
])
def test_device_config_values_have_the_command_lines_bounds(
        tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "device.toml"
    path.write_text(f'broker = "mqtt://h"\n{line}\n')
    with pytest.raises(ProfileError, match=rf"device\.toml: {error}"):
        load_device_config(path)
    path.write_text('broker = "mqtt://h"\nthreads = 4\nid = "board-1"\nprefix = "farm/a"\n')
    assert load_device_config(path)["threads"] == 4


def test_the_dry_run_codes_its_smashed_data_as_the_device_does(tmp_path: Path) -> None:
    """The memory probe's step codes its upload with the run's codec on the uplink thread
    (its temporaries count in the peak): a codec that refuses the batch fails the probe as
    it would fail the round."""
    from edge_runtime.bundle import load_bundle
    from edge_runtime.profiles import dry_run_step
    from edge_runtime.protocol import TrainConfig
    from edge_runtime.protocol.smashed_codec import SmashedCodecError
    from edge_runtime.runtime import LocalModel
    from exporter.export import export_split

    export_split("cnn", (1, 8, 8), 10, tmp_path / "b", seed=0)
    bundle = load_bundle(tmp_path / "b")
    model = LocalModel(bundle, 1)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 16, size=(32, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    assert dry_run_step(model, bundle.weights, x, y, 8, TrainConfig()) > 0  # int8: fits
    # weights x 1e5: conv1's outputs reach ~1e6, beyond float16's 65504
    big = (bundle.weights * np.float32(1e5)).astype(np.float32)
    with pytest.raises(SmashedCodecError, match="float16"):
        dry_run_step(model, big, x, y, 8, TrainConfig(smashed_codec="fp16"))
