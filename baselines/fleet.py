"""`heron bench --workload fleet`: one server and N devices over one broker, for N in a list.

For each N it starts a fresh broker (a real Mosquitto by default, configured as in
`fleet_mosquitto_conf`; or the embedded amqtt one, `heron broker`, with `broker="embedded"`),
one `heron server` process and ceil(N / per_host) `heron devices host` processes (many
devices per process, `devices.host`), runs the federation and measures it from outside:

- round times and updates from the server's metrics.jsonl (and any `*_seconds` split of
  the server's time it holds);
- CPU seconds and peak RSS (VmHWM) of the server, the broker and the device hosts, sampled
  with psutil; the server's main thread apart (training, aggregation, evaluation: what is
  not waiting);
- messages and bytes per second through the broker from Mosquitto's ``$SYS`` counters
  (published every second, so a rate is over the rounds plus up to a second each side);
- the first error: the server's exit, lost updates, messages the broker dropped, a host's.

Writes DIR/fleet.json (one row per N), DIR/fleet.md (the table) and DIR/fleet.png (round
time and throughput against N); each N's files under DIR/nN/.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from baselines.fleet_probes import Sampler, SysCounters, thread_summary
from baselines.fleet_report import markdown, plot_fleet, summary_line
from baselines.profile import machine
from devices.host import raise_open_files

ROUNDS_START = "devices, rounds "  # the server's line once every device is ready
# Mosquitto's stock max_queued_messages is 1000 per client: a server busy training while a
# thousand devices upload needs its session to queue a whole round's updates and smashed data
QUEUED_MESSAGES = 100_000


class FleetBenchError(RuntimeError):
    """The bench cannot run here (no mosquitto, bad options)."""


@dataclass(frozen=True)
class FleetConfig:
    devices: tuple[int, ...] = (10, 100, 300, 1000)
    rounds: int = 3
    dataset: str = "digits"
    model: str = "cnn"
    local_steps: int = 10
    per_host: int = 250  # devices per `heron devices host` process
    broker: str = "mosquitto"  # or "embedded" (amqtt, `heron broker`)
    join_timeout: float = 900.0
    round_timeout: float = 600.0
    seed: int = 0
    run_args: tuple[str, ...] = ()  # more `heron server` options, as given
    stop_after_failure: bool = True  # a larger fleet fails the same way, only slower

    def __post_init__(self) -> None:
        if not self.devices or min(self.devices) < 1:
            raise ValueError(f"--devices needs positive counts, got {self.devices}")
        if self.broker not in ("mosquitto", "embedded"):
            raise ValueError(f"broker must be mosquitto or embedded, got {self.broker!r}")


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None)
    if path is None:
        raise FleetBenchError("mosquitto is not installed; help: apt-get install mosquitto "
                              "(or brew install mosquitto), or --broker embedded for small "
                              "fleets")
    return path


def fleet_mosquitto_conf(port: int) -> str:
    """Stock Mosquitto 2 except: $SYS every second (the throughput figures) and a deeper
    per-client queue (`QUEUED_MESSAGES`)."""
    return (f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"sys_interval 1\nmax_queued_messages {QUEUED_MESSAGES}\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FleetBenchError(f"the broker exited with code {proc.returncode} before "
                                  f"listening on port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise FleetBenchError(f"the broker did not listen on 127.0.0.1:{port} within {timeout} s")


def _heron(*args: str) -> list[str]:
    return [sys.executable, "-m", "heron", *args]


@dataclass
class _Watch:
    """What the server's stdout told us, with when."""

    rounds_start: float | None = None
    rounds_end: float | None = None
    last_round: int = 0
    lines: list[str] = field(default_factory=list)


def _relay_server(stream: IO[str], watch: _Watch, rounds: int, n: int,
                  on_rounds: Callable[[str], None], progress: Callable[[str], None]) -> None:
    last_wait = 0.0
    for line in stream:
        line = line.rstrip("\n")
        watch.lines.append(line)
        now = time.monotonic()
        if line.startswith("waiting for devices"):
            if now - last_wait < 5.0:
                continue  # one a poll while a thousand devices join
            last_wait = now
        elif line.startswith("run ") and ROUNDS_START in line and watch.rounds_start is None:
            watch.rounds_start = now
            on_rounds("start")
        elif line.startswith("round "):
            try:
                watch.last_round = int(line.split()[1].split("/")[0])
            except (IndexError, ValueError):
                pass
            if watch.last_round >= rounds:
                watch.rounds_end = now
                on_rounds("end")
        progress(f"  [{n} devices] {line}")


def run_one(n: int, cfg: FleetConfig, out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """One federation of `n` devices; its row of fleet.json."""
    from devices.fleet import FleetOptions, make_shards, stop_all, terminate
    from heron.lifecycle import child_env

    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    make_shards(FleetOptions(out=out, devices=n, dataset=cfg.dataset, seed=cfg.seed),
                out / "shards")
    port = _free_port()
    env = child_env()
    sampler = Sampler()
    procs: list[subprocess.Popen] = []
    counters: SysCounters | None = None
    watch = _Watch()
    marks: dict[str, dict[str, Any]] = {}
    row: dict[str, Any] = {"devices": n, "hosts": math.ceil(n / cfg.per_host),
                           "broker": cfg.broker, "error": None}
    t0 = time.monotonic()
    try:
        if cfg.broker == "mosquitto":
            (out / "mosquitto.conf").write_text(fleet_mosquitto_conf(port))
            broker = subprocess.Popen([mosquitto_binary(), "-c", str(out / "mosquitto.conf")],
                                      stdout=subprocess.DEVNULL,
                                      stderr=(logs / "broker.log").open("w"))
        else:
            broker = subprocess.Popen(_heron("broker", "--port", str(port)), env=env,
                                      stdout=subprocess.DEVNULL,
                                      stderr=(logs / "broker.log").open("w"))
        procs.append(broker)
        sampler.add("broker", broker.pid)
        _wait_port(port, broker)
        url = f"mqtt://127.0.0.1:{port}"
        if cfg.broker == "mosquitto":
            counters = SysCounters(port)
        server = subprocess.Popen(
            _heron("server", "--broker", url, "--out", str(out / "server"), "--devices", str(n),
                   "--rounds", str(cfg.rounds), "--dataset", cfg.dataset, "--model", cfg.model,
                   "--local-steps", str(cfg.local_steps), "--seed", str(cfg.seed),
                   "--join-timeout", str(cfg.join_timeout),
                   "--round-timeout", str(cfg.round_timeout), *cfg.run_args),
            stdout=subprocess.PIPE, stderr=(logs / "server.log").open("w"), text=True,
            stdin=subprocess.DEVNULL, env=env)
        procs.append(server)
        sampler.add("server", server.pid)

        def mark(what: str) -> None:
            marks[what] = {"t": time.monotonic(), "load": os.getloadavg()[0],
                           **sampler.snapshot()}

        mark("launched")

        relay = threading.Thread(target=_relay_server, name="fleet-server-stdout",
                                 args=(server.stdout, watch, cfg.rounds, n, mark, progress),
                                 daemon=True)
        relay.start()
        hosts = []
        for h in range(row["hosts"]):
            first = h * cfg.per_host
            hosts.append(subprocess.Popen(
                _heron("devices", "host", "--broker", url, "--shards", str(out / "shards"),
                       "--first", str(first), "--count", str(cfg.per_host), "--threads", "1",
                       "--bundle-cache", str(out / "device-bundles")),
                stdout=(logs / f"host-{h}.log").open("w"), stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env))
            sampler.add("hosts", hosts[-1].pid)
        procs.extend(hosts)
        sampler.start()
        progress(f"  [{n} devices] broker {cfg.broker} on {url}, server pid {server.pid}, "
                 f"{len(hosts)} device host processes ({cfg.per_host} devices each at most)")
        try:
            code = server.wait(timeout=cfg.join_timeout + cfg.rounds * cfg.round_timeout + 120)
        except subprocess.TimeoutExpired:
            code = None
            row["error"] = "the server did not finish in time (killed)"
        relay.join(10)
        host_codes = stop_all(hosts, grace=30) if code == 0 else terminate(hosts, grace=10)
        if code not in (0, None):
            row["error"] = f"server exited with code {code}: {_last_error(logs / 'server.log')}"
        elif code == 0 and any(c != 0 for c in host_codes):
            row["error"] = _first_host_error(logs, row["hosts"])
    finally:
        sampler.stop()
        terminate([p for p in procs if p.poll() is None], grace=10)
        if counters is not None:
            counters.stop()
    row["wall_seconds"] = round(time.monotonic() - t0, 1)
    _fill_row(row, cfg, out, watch, marks, sampler, counters)
    return row


def _last_error(log_path: Path) -> str:
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no server log"
    mine = [ln for ln in lines if ln.startswith("heron server: ")]
    return mine[-1] if mine else (lines[-1] if lines else "no output")


def _first_host_error(logs: Path, hosts: int) -> str | None:
    for h in range(hosts):
        try:
            for line in (logs / f"host-{h}.log").read_text(errors="replace").splitlines():
                if " ERROR " in line or line.startswith("Traceback") or "first error" in line:
                    return f"host-{h}: {line.strip()}"
        except OSError:
            continue
    return None


def _fill_row(row: dict[str, Any], cfg: FleetConfig, out: Path, watch: _Watch,
              marks: dict[str, dict[str, Any]], sampler: Sampler,
              counters: SysCounters | None) -> None:
    n = row["devices"]
    recs = []
    metrics = out / "server" / "metrics.jsonl"
    if metrics.exists():
        recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    secs = [r["round_seconds"] for r in recs]
    row.update({
        "rounds": cfg.rounds,
        "rounds_completed": len(recs),
        "round_seconds": secs,
        "round_seconds_median": round(statistics.median(secs), 3) if secs else None,
        "updates_expected": sum(len(r["participants"]) for r in recs)
        if len(recs) == cfg.rounds else n * cfg.rounds,
        "updates_received": sum(len(r["updates"]) for r in recs),
        "final_test_accuracy": recs[-1]["test_accuracy"] if recs else None,
        "bytes_up_per_round": statistics.median(r["round_bytes_up"] for r in recs)
        if recs else None,
        "bytes_down_per_round": statistics.median(r["round_bytes_down"] for r in recs)
        if recs else None,
    })
    split = {k: statistics.median(float(r[k]) for r in recs) for k in (recs[0] if recs else {})
             if k.endswith("_seconds") and k not in ("round_seconds", "elapsed_seconds")
             and all(isinstance(r.get(k), (int, float)) for r in recs)}
    row["server_time_split_seconds"] = split or None  # as far as metrics.jsonl gives it
    start, end = marks.get("start"), marks.get("end")
    launched = marks.get("launched")
    # from the server's start to every device ready: its startup, N connections, N bundles
    row["join_seconds"] = round(start["t"] - launched["t"], 1) if start and launched else None
    # other processes on the machine compete for its cores: the 1-minute load average
    row["load_average"] = [round(m["load"], 2) for m in (start, end) if m is not None]
    window = None
    if start is not None and end is not None:
        window = end["t"] - start["t"]
        row["rounds_window_seconds"] = round(window, 3)

        def share(kind: str, role: str) -> float | None:
            a, b = start[kind].get(role), end[kind].get(role)
            return None if a is None or b is None else round((b - a) / window, 3)

        # cores busy during the rounds, per process group (2.0 = both cores of this machine)
        row["cores_busy"] = {role: share("cpu", role) for role in ("server", "broker", "hosts")}
        main = share("main_cpu", "server")
        row["server_main_thread_busy"] = main  # training + aggregation + evaluation
        row["server_waiting_share"] = None if main is None else round(max(0.0, 1 - main), 3)
    if counters is not None and start is not None and end is not None:
        for name in ("msgs_in", "msgs_out", "bytes_in", "bytes_out"):
            rate = counters.rate(name, start["t"], end["t"])
            row[f"broker_{name}_per_s"] = None if rate is None else round(rate, 1)
        row["broker_dropped"] = counters.last("dropped")
    # threads of the device hosts and the machine's load, over the rounds when they ran
    # (else over the whole attempt: where 1,000 devices broke, no round ended)
    rounds = start is not None and end is not None
    row["host_threads"] = thread_summary(sampler.threads, "hosts",
                                         start["t"] if rounds else None,
                                         end["t"] if rounds else None)
    row["host_threads"]["over"] = "rounds" if rounds else "whole run"
    row["cpu_seconds"] = {role: round(sum(v.values()), 1) for role, v in sampler.cpu.items()}
    row["server_peak_rss_mb"] = _peak(sampler, "server")
    row["broker_peak_rss_mb"] = _peak(sampler, "broker")
    row["host_peak_rss_mb"] = _peak(sampler, "hosts")
    row["hosts_peak_rss_mb_total"] = round(sum(sampler.hwm.get("hosts", {}).values()), 1)
    if row["error"] is None:
        if len(recs) < cfg.rounds:
            row["error"] = f"only {len(recs)}/{cfg.rounds} rounds completed"
        elif row["updates_received"] < row["updates_expected"]:
            lost = row["updates_expected"] - row["updates_received"]
            row["error"] = f"{lost} of {row['updates_expected']} updates lost"
        elif row.get("broker_dropped"):
            row["error"] = f"the broker dropped {row['broker_dropped']:.0f} messages"
        elif cfg.broker == "embedded":
            row["error"] = _broker_complaint(out / "logs" / "broker.log")


def _broker_complaint(log_path: Path) -> str | None:
    """The embedded broker's first complaint (`server.broker.QuietBrokerLog`), if any."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((ln.split(";")[0] for ln in lines if ln.startswith("heron: ")), None)


def _peak(sampler: Sampler, role: str) -> float | None:
    v = sampler.hwm.get(role)
    return round(max(v.values()), 1) if v else None


def run_fleet(out: str | Path, cfg: FleetConfig, *, command: str | None = None,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every N of `cfg.devices` in turn; writes fleet.json, fleet.md and fleet.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.broker == "mosquitto":
        mosquitto_binary()  # a clear error before any work
    # the broker and the hosts inherit it: N MQTT connections plus the bench's own files
    limit = raise_open_files(256 + 4 * max(cfg.devices))
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for n in cfg.devices:
        progress(f"heron bench fleet: {n} devices, {cfg.rounds} rounds "
                 f"({len(rows) + 1}/{len(cfg.devices)}; {time.monotonic() - t0:.0f} s so far)")
        row = run_one(n, cfg, out / f"n{n}", progress)
        rows.append(row)
        progress(f"heron bench fleet: {n} devices: " + summary_line(row))
        report = {
            "workload": "fleet",
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": machine(),
            "open_files_limit": limit,
            "config": asdict(cfg),
            "rows": rows,
            "first_failure": next(({"devices": r["devices"], "error": r["error"]}
                                   for r in rows if r["error"]), None),
            "wall_s": round(time.monotonic() - t0, 1),
        }
        (out / "fleet.json").write_text(json.dumps(report, indent=2) + "\n")
        if row["error"] and cfg.stop_after_failure:
            progress(f"heron bench fleet: stopping the sweep at {n} devices: {row['error']}")
            break
    (out / "fleet.md").write_text(markdown(report))
    plot = plot_fleet(report, out / "fleet.png")
    report["plot"] = str(plot) if plot else None
    return report


def parse_devices(text: str) -> tuple[int, ...]:
    try:
        ns = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        ns = ()
    if not ns or min(ns) < 1:
        raise ValueError(f"--devices for the fleet workload takes counts like 10,100,300,1000; "
                         f"got {text!r}")
    return ns

