"""The fleet bench's report: one console line per size, the markdown table and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def summary_line(row: dict[str, Any]) -> str:
    med = row["round_seconds_median"]
    return (f"round {med if med is not None else float('nan'):.1f} s (median), updates "
            f"{row['updates_received']}/{row['updates_expected']}, "
            f"cores busy {row.get('cores_busy')}, "
            f"broker {row.get('broker_msgs_in_per_s')} msg/s in, "
            f"{row['wall_seconds']:.0f} s in all"
            + (f"; error: {row['error']}" if row["error"] else ""))


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(report: dict[str, Any]) -> str:
    """The fleet table as BENCHMARKS.md shows it."""
    cfg, m = report["config"], report["machine"]
    lines = [
        f"Fleet: {cfg['model']} on {cfg['dataset']}, {cfg['rounds']} rounds of "
        f"{cfg['local_steps']} local steps, {cfg['broker']} broker, devices in processes of "
        f"{cfg['per_host']}; {m['cpus']} CPUs ({m['cpu']}), {m['memory_gb']} GB",
        "",
        "| devices | round s (median) | updates recv/exp | cores busy: server / broker / "
        "devices | server main thread busy | broker msg/s in / out | broker MB/s in / out "
        "| server CPU s / peak RSS MB | broker CPU s / peak RSS MB | device hosts peak RSS MB "
        "(largest / all) | host threads / runnable max / runnable mean / 1-min load max "
        "| error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        busy = r.get("cores_busy") or {}
        cpu = r.get("cpu_seconds", {})
        mb_in = r.get("broker_bytes_in_per_s")
        mb_out = r.get("broker_bytes_out_per_s")
        lines.append(
            f"| {r['devices']} | {_f(r['round_seconds_median'])} "
            f"| {r['updates_received']}/{r['updates_expected']} "
            f"| {_f(busy.get('server'), '{:.2f}')} / {_f(busy.get('broker'), '{:.2f}')} / "
            f"{_f(busy.get('hosts'), '{:.2f}')} | {_f(r.get('server_main_thread_busy'), '{:.2f}')}"
            f" | {_f(r.get('broker_msgs_in_per_s'), '{:.0f}')} / "
            f"{_f(r.get('broker_msgs_out_per_s'), '{:.0f}')} "
            f"| {_f(None if mb_in is None else mb_in / 1e6, '{:.2f}')} / "
            f"{_f(None if mb_out is None else mb_out / 1e6, '{:.2f}')} "
            f"| {_f(cpu.get('server'))} / {_f(r.get('server_peak_rss_mb'), '{:.0f}')} "
            f"| {_f(cpu.get('broker'))} / {_f(r.get('broker_peak_rss_mb'), '{:.0f}')} "
            f"| {_f(r.get('host_peak_rss_mb'), '{:.0f}')} / "
            f"{_f(r.get('hosts_peak_rss_mb_total'), '{:.0f}')} | {_threads(r)} "
            f"| {r['error'] or ''} |")
    lines += ["", "Cores busy: CPU seconds per wall second over the rounds (from the first "
              "round's start to the last round's end), summed over the group's processes. "
              "Broker rates from Mosquitto's $SYS counters (1 s resolution). Peak RSS: VmHWM "
              "per process, MB = 2^20 bytes. Host threads: the largest host process's thread "
              "count and its threads in state R (/proc, every 0.5 s) over the rounds, or over "
              "the whole attempt where no round ended; the machine's 1-minute load average."]
    return "\n".join(lines) + "\n"


def _threads(r: dict[str, Any]) -> str:
    t = r.get("host_threads") or {}
    return (f"{_f(t.get('threads_max'), '{:.0f}')} / {_f(t.get('runnable_max'), '{:.0f}')} / "
            f"{_f(t.get('runnable_mean'), '{:.1f}')} / {_f(t.get('load_1min_max'), '{:.0f}')}")


def plot_fleet(report: dict[str, Any], path: Path) -> Path | None:
    """Round time and broker throughput against N; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["rows"] if r["round_seconds_median"] is not None]
    if not rows:
        return None
    ns = [r["devices"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(ns, [r["round_seconds_median"] for r in rows], "o-", color="tab:red")
    ax1.set_xscale("log")
    ax1.set_xlabel("devices")
    ax1.set_ylabel("round wall time (s, median)")
    ax1.set_title("round time")
    for key, label in (("broker_msgs_in_per_s", "messages in"),
                       ("broker_msgs_out_per_s", "messages out")):
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            ax2.plot(ns, [v if v is not None else float("nan") for v in vals], "o-",
                     label=label)
    ax2.set_xscale("log")
    ax2.set_xlabel("devices")
    ax2.set_ylabel("messages / s through the broker")
    ax2.set_title("broker throughput")
    ax2.legend()
    cfg = report["config"]
    fig.suptitle(f"{cfg['model']} on {cfg['dataset']}, {cfg['local_steps']} local steps, "
                 f"{cfg['broker']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
