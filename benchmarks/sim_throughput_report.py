"""The tables of ``sim_throughput.py``: its derived figures (R_best, switch cost) and its .md report."""

from __future__ import annotations

import argparse
import json
import os

from common import RESULTS


def with_best_central(row: dict) -> dict:
    """Add R_best, the fastest federated run against the fastest centralized repetition (a shared machine's slower
    repetitions are other work's), and the client switch cost: the last round's seconds per client beyond what its
    samples cost centrally (median fit), in milliseconds and in centralized SGD steps of one batch."""
    best = row["central"]["samples"] / min(row["central"]["all_seconds"])
    fed_best = row.get("best_samples_per_s", row["samples_per_s"])  # rows written before --fed-repeats: their one run
    fed_best_last = row.get("best_last_round_samples_per_s", row["last_round_samples_per_s"])
    per_client = row["samples"] / row["rounds"] / row["clients_per_round"]
    switch_s = row["last_round_s"] / row["clients_per_round"] - per_client / row["central_samples_per_s"]
    step_s = int(row.get("batch_size", 10)) / row["central_samples_per_s"]  # rows written before the field: batch 10
    return {**row, "central_best_samples_per_s": best, "R_best_central": fed_best / best,
            "R_last_round_best_central": fed_best_last / best,
            "switch_ms": 1000 * switch_s, "switch_steps": switch_s / step_s}


def table(results: list[dict], args, commands: list[str], load: list[float]) -> str:
    lines = [
        "# Simulation throughput R(N) (issue 15)",
        "",
        f"R = federated training samples/s ÷ centralized training samples/s; torch threads {args.threads} on both sides "
        f"(Ray: `client_resources.num_cpus={args.threads}`, in-process: the same count while a client runs). "
        f"{' and '.join(map(str, args.samples_per_client))} images per client, batch {args.batch_size}, {args.rounds} round(s), "
        "SGD (features: Adam, its autoencoder settings). Denormal floats: "
        + ("flushed to zero on both sides (`flush_denormal=true`)." if getattr(args, "flush_denormal", False) else "kept (torch's default) on both sides."),
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands),
        "",
        f"Centralized: median of {2 * args.repeats} timed fits, {args.repeats} before and {args.repeats} after the federated runs it is compared with. 1-minute load average of the machine before / after: "
        + "; ".join(f"{load[i]:.1f} / {load[i + 1]:.1f}" for i in range(0, len(load) - 1, 2)) + f" ({os.cpu_count()} cores; one pair per command).",
        "",
        f"Federated: each configuration run {args.fed_repeats} time(s), each right after a timed centralized fit, and one "
        "more fit after the last run. R: the median federated run over the median centralized fit; R_best: the fastest "
        "federated run over the fastest centralized fit (on a shared machine the slower repetitions of either side are "
        "other work's); R_paired: the median over the runs of each run's rate over the rate of the two centralized fits "
        "beside it (this VM's speed drifts by tens of percent within minutes; a pair sees the same machine). Last round: the first round of a Ray run also pays for its "
        "workers' imports and data loading. Switch: the last round's time per client beyond what its samples cost "
        "centrally (median fit), in ms and in centralized SGD steps of one batch (the issue's client switch cost; "
        "features: autoencoder steps).",
        "",
        "| workload | images/client | protocol | N | backend | fed samples/s (last round) | central samples/s median / best | R | R last round | "
        "R_best | R_best last round | R_paired | switch ms (SGD steps) | fit s | command s |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in map(with_best_central, results):
        protocol = r["protocol"] + (f" (lr {r['lr_override']:g})" if r.get("lr_override") is not None else "")
        paired = f"{r['R_paired']:.2f}" if "R_paired" in r else "–"  # rows measured before pairing
        lines.append(f"| {r['workload']} | {r.get('samples_per_client', 60)} | {protocol} | {r['clients_per_round']} | {backend_label(r)} | {r['samples_per_s']:.0f} "
                     f"({r['last_round_samples_per_s']:.0f}) | {r['central_samples_per_s']:.0f} / {r['central_best_samples_per_s']:.0f} | "
                     f"{r['R']:.2f} | {r['R_last_round']:.2f} | {r['R_best_central']:.2f} | {r['R_last_round_best_central']:.2f} | {paired} | "
                     f"{r['switch_ms']:.1f} ({r['switch_steps']:.1f}) | {r['fit_s']:.1f} | {r['command_s']:.1f} |")
    return "\n".join(lines) + "\n"


def backend_label(row: dict) -> str:
    """The backend column: ``inprocess x2`` for clients served side by side on two workers."""
    workers = int(row.get("client_workers", 1))
    return row["backend"] + (f" x{workers}" if workers > 1 else "")


def report(payload: dict, args) -> str:
    """The .md text of a results payload: the table, then its failures and notes."""
    text = table(payload["results"], args, payload["commands"], payload["load_average_1min_before_after"])
    text += "".join(f"\nFailed: {f.get('samples_per_client', 60)} images/client {f['protocol']} N={f['clients_per_round']} {f['backend']}: "
                    f"{f['error'][:300]}\n" for f in payload["failures"])
    return text + "".join(f"\nNote: {note}\n" for note in payload.get("notes", []))


def render_existing(args, name: str) -> int:
    """Rewrite the .md from the .json (no new measurement)."""
    path = RESULTS / f"{name}.json"
    payload = json.loads(path.read_text())
    payload.setdefault("commands", [payload.pop("command", "")])
    payload["results"] = [with_best_central(row) for row in payload["results"]]
    saved = argparse.Namespace(**{**vars(args), "threads": payload["torch_threads"], "flush_denormal": payload.get("flush_denormal", False)})
    saved.samples_per_client = sorted({int(row.get("samples_per_client", 60)) for row in payload["results"]})
    for flag in ("rounds", "batch_size", "repeats", "fed_repeats"):  # what the first command set, else the defaults
        first = payload["commands"][0]
        if f"--{flag.replace('_', '-')} " in first:
            setattr(saved, flag, int(first.split(f"--{flag.replace('_', '-')} ")[1].split()[0]))
    text = report(payload, saved)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(text)
    print(text)
    return 0


