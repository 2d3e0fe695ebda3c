"""The screen's report: one row per parameter set, summarised over its lr grid, as markdown."""

from __future__ import annotations

from typing import Any


def summarise(name: str, d_set: int, rho2: float, runs: list[dict[str, Any]],
               start: dict[str, float]) -> dict[str, Any]:
    best_loss = min((p["test_loss"], p["step"], r["lr"]) for r in runs
                     for p in r["curve"][1:])
    best_acc = max((p["test_accuracy"], -p["step"], r["lr"]) for r in runs
                    for p in r["curve"][1:])
    by_loss = next(r for r in runs if r["lr"] == best_loss[2])
    last = by_loss["curve"][-1]
    return {"set": name, "d": d_set, "rho2": rho2, "zo_merit_5000": 5000.0 * rho2 / (d_set + 2),
            "best_lr": best_loss[2], "best_dloss": best_loss[0] - start["test_loss"],
            "best_dloss_step": best_loss[1],
            "best_dacc": best_acc[0] - start["test_accuracy"], "best_dacc_step": -best_acc[1],
            "best_dacc_lr": best_acc[2],
            "last_dloss": last["test_loss"] - start["test_loss"],
            "last_dacc": last["test_accuracy"] - start["test_accuracy"],
            "ms_per_step": min(r["ms_per_step"] for r in runs), "runs": runs}


def row_md(r: dict[str, Any]) -> str:
    return (f"| {r['set']} | {r['d']:,} | {r['rho2']:.3g} | {r['zo_merit_5000']:.3g} | "
            f"{r['best_lr']:.3g} | {r['best_dloss']:+.4f} ({r['best_dloss_step']}) | "
            f"{100 * r['best_dacc']:+.2f} ({r['best_dacc_step']}) | "
            f"{r['last_dloss']:+.4f} / {100 * r['last_dacc']:+.2f} | {r['ms_per_step']:.0f} |")


def screen_markdown(report: dict[str, Any]) -> str:
    r, s, c = report["run"], report["start"], report["config"]
    lines = [f"{r['model']}/{r['cut']} on {r['dataset']}, server fixed, aux = server; "
             f"{c['device']}'s {r['shard_samples']} samples, batch {r['batch_size']}, "
             f"{c['steps']} backprop steps ({c.get('optimizer', 'adam')}) per set and lr, test set "
             f"({r['test_samples']}) every {c['eval_every']} steps. Start (frozen device): "
             f"acc {100 * s['test_accuracy']:.2f}, loss {s['test_loss']:.4f}.",
             "", "rho2: share of the shard's mean-gradient energy in the set (lnbias: "
             "relative to all-LoRA's); merit: 5000·rho2/(d+2) ~ backprop steps that 5,000 "
             "q=1 ZO steps are worth; best: over the curve and the lr grid, selected on the "
             "test set (a ceiling). Subspace lr = move/sqrt(K).", ""]
    if "cos_guide_shard" in report:
        lines += [f"guide: {report['guide_size']} held-out rows, batches of "
                  f"{c['guide_batch']}, basis recomputed every {c['guide_every']} steps; "
                  f"cos(guide mean gradient, shard gradient) = "
                  f"{report['cos_guide_shard']:.3f}", ""]
    sig = report.get("signal", {})
    if sig:
        lines += ["mean gradients on the LoRA of the last device layer (a diagnostic; the test "
                  "set trains nothing): " + ", ".join(
                      f"{k.replace('_', ' ')} {v:.3f}" for k, v in sig.items()), ""]
    lines += ["| set | d | rho2 | merit | lr | best Δ loss (step) | best Δ acc pts (step) | "
              "last Δ loss / Δ acc | ms/step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [row_md(row) for row in report["rows"]]
    return "\n".join(lines) + "\n"
