"""Ko's Table 4 in the shape of graftfl: centralized vs DSSGD(θu) vs standalone.

Runs (``--run``) the one multirun command ``graftfl sim -m experiment=ko_table4``
and/or collects its run directories into ``docs/benchmarks/ko_table4.{md,json,png}``:
final mean local-model accuracy (min, max) per arm, the global model's
accuracy, upload bytes per participant per round against a dense FedAvg upload
of the same model, ε, and the issue's targets checked against the measurements.

    flock /tmp/graftfl-bench.lock python benchmarks/ko_table4.py --run
    python benchmarks/ko_table4.py --runs runs/ko_table4          # collect only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks"
NAME = "ko_table4"
FLOAT32_BYTES = 4
ARM_ORDER = {"centralized": 0, "dssgd": 1, "standalone": 3}


def run_sweep(extra: list[str]) -> tuple[list[Path], float]:
    """Run the multirun; return the run directories it printed and its wall seconds."""
    args = [sys.executable, "-m", "graftfl.cli", "sim", "-m", "experiment=ko_table4", "progress=false", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    print("running:", " ".join(args[2:]), flush=True)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dirs = []
    for line in proc.stdout:
        if line.startswith(("run: ", "[multirun]")) or "] round " in line:
            print(line.rstrip(), flush=True)
        if line.startswith("run: "):
            run_dirs.append(ROOT / line.removeprefix("run: ").strip())
    if proc.wait() != 0:  # keep what finished: the table says which arms are missing
        print(f"WARNING: the multirun exited {proc.returncode}; collecting the {len(run_dirs)} finished runs", file=sys.stderr)
    return run_dirs, time.monotonic() - started


def load_run(run_dir: Path) -> dict:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"dir": run_dir, "config": config, "summary": summary, "rows": rows}


def arm_of(config: dict) -> dict:
    """What a run is: protocol, θu (dssgd) and whether DP-SGD is on."""
    protocol = config["protocol"]["name"]
    dp = config["privacy"]["name"] == "dpsgd"
    theta = config["protocol"].get("theta_upload") if protocol == "dssgd" else None
    label = {"centralized": "centralized SGD", "standalone": "standalone (θu = 0)"}.get(protocol, f"DSSGD θu = {theta}")
    if dp:
        label += f" + DP-SGD (target ε = {config['privacy'].get('target_epsilon')})"
    return {"protocol": protocol, "theta_upload": theta, "dpsgd": dp, "label": label}


def row_of(run: dict) -> dict:
    """One table row from a run directory."""
    final, config, summary = run["rows"][-1], run["config"], run["summary"]
    arm = arm_of(config)
    uploads = [b for row in run["rows"] for b in row.get("client_bytes_up", [])]
    num_params = summary.get("num_params")
    per_upload = sum(uploads) / len(uploads) if uploads else 0.0
    dense = num_params * FLOAT32_BYTES if num_params else None
    return {
        **arm,
        "run": str(run["dir"].relative_to(ROOT)) if run["dir"].is_relative_to(ROOT) else str(run["dir"]),
        "dataset": config["dataset"]["name"],
        "model": config["model"]["name"],
        "rounds": int(final["round"]),
        "accuracy": final["accuracy"],
        "accuracy_min": final.get("local_accuracy_min"),
        "accuracy_max": final.get("local_accuracy_max"),
        "global_accuracy": final.get("global_accuracy"),
        "best_accuracy": max(row["accuracy"] for row in run["rows"] if row.get("accuracy") is not None),
        "upload_bytes_per_participant_round": per_upload,
        "dense_fedavg_upload_bytes": dense,
        "upload_fraction_of_dense": per_upload / dense if dense else None,
        "epsilon": summary.get("epsilon"),
        "wall_s": summary.get("wall_s"),
    }


def latest_per_arm(runs: list[dict]) -> list[dict]:
    """The newest finished run of each arm (a re-run replaces an older one)."""
    chosen: dict[str, dict] = {}
    for run in sorted(runs, key=lambda r: r["dir"].name):
        if arm_of(run["config"])["protocol"] not in ARM_ORDER:
            continue  # e.g. a fedavg run in the same folder
        chosen[arm_of(run["config"])["label"]] = run
    order = lambda r: (  # noqa: E731  centralized, dssgd by θu descending, DP, standalone
        ARM_ORDER[r["protocol"]] + (1 if r["dpsgd"] else 0),
        -(r["theta_upload"] or 0),
    )
    return sorted((row_of(run) for run in chosen.values()), key=order)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured figure and whether it is met."""
    by = {(r["protocol"], r["theta_upload"], r["dpsgd"]): r for r in rows}
    central, alone = by.get(("centralized", None, False)), by.get(("standalone", None, False))
    d1, d01, d1_dp = by.get(("dssgd", 0.1, False)), by.get(("dssgd", 0.01, False)), by.get(("dssgd", 0.1, True))
    checks = []
    pp = lambda a, b: 100.0 * (a - b)  # noqa: E731
    if central and d1:
        gap = pp(central["accuracy"], d1["accuracy"])
        checks.append({"target": "θu=0.1 within 2 pp of centralized", "measured": f"centralized − DSSGD = {gap:+.2f} pp", "met": gap <= 2.0})
    if central and d01:
        gap = pp(central["accuracy"], d01["accuracy"])
        checks.append({"target": "θu=0.01 within 5 pp of centralized", "measured": f"centralized − DSSGD = {gap:+.2f} pp", "met": gap <= 5.0})
    if alone and d1:
        gap = pp(d1["accuracy"], alone["accuracy"])
        checks.append({"target": "standalone ≥ 3 pp below θu=0.1", "measured": f"DSSGD θu=0.1 − standalone = {gap:+.2f} pp", "met": gap >= 3.0})
    if d01 and d01["upload_fraction_of_dense"] is not None:
        frac = 100.0 * d01["upload_fraction_of_dense"]
        checks.append({"target": "upload at θu=0.01 ≤ 3% of dense FedAvg upload", "measured": f"{frac:.2f}%", "met": frac <= 3.0})
    if d1 and d1_dp:
        cost = pp(d1["accuracy"], d1_dp["accuracy"])
        checks.append({"target": "accuracy cost of DP-SGD at ε≈3 (reported)", "measured": f"no DP − DP = {cost:+.2f} pp (ε = {d1_dp['epsilon']:.2f})", "met": None})
    return checks


def markdown(rows: list[dict], checks: list[dict], meta: dict) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [
        f"# Ko Table 4 shape: centralized vs DSSGD vs standalone ({meta['dataset']}, {meta['model']})",
        "",
        f"{meta['num_clients']} participants × {meta['samples_per_client']} samples, {meta['rounds']} rounds of one local epoch "
        f"(batch {meta['batch_size']}, lr {meta['lr']}), θd = 1, participants in round-robin order. Accuracy: mean of the "
        f"participants' own models on a fixed {meta['test_size'] or 'full'}-image test subset after the last round "
        "(centralized: its one model). Measured on a 2-core machine shared with other jobs.",
        "",
        f"Command: `{meta['command']}`"
        + (f" — {meta['sweep_wall_s'] / 60:.1f} min for all arms, Ray start-up included." if meta.get("sweep_wall_s") else ""),
        "",
        "| arm | accuracy % (mean) | min | max | global model % | best round % | upload B / participant / round | % of dense FedAvg upload | ε |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = "–" if r["upload_fraction_of_dense"] is None or r["protocol"] != "dssgd" else f"{100 * r['upload_fraction_of_dense']:.2f}"
        upload = f"{r['upload_bytes_per_participant_round']:.0f}" if r["protocol"] == "dssgd" else "0"
        eps = "–" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {r['label']} | {pct(r['accuracy'])} | {pct(r['accuracy_min'])} | {pct(r['accuracy_max'])} | {pct(r['global_accuracy'])} "
            f"| {pct(r['best_accuracy'])} | {upload} | {frac} | {eps} |"
        )
    dense = next((r["dense_fedavg_upload_bytes"] for r in rows if r["dense_fedavg_upload_bytes"]), None)
    if dense:
        lines += ["", f"A dense FedAvg upload of the same model is {dense} B per participant per round (float32)."]
    lines += ["", "## Targets (issue 4)", "", "| target | measured | met |", "|---|---|---|"]
    for check in checks:
        met = "reported" if check["met"] is None else ("yes" if check["met"] else "**no**")
        lines.append(f"| {check['target']} | {check['measured']} | {met} |")
    lines += ["", f"![accuracy vs θu]({NAME}.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sweep = sorted((r for r in rows if r["protocol"] == "dssgd" and not r["dpsgd"]), key=lambda r: r["theta_upload"])
    if sweep:
        xs = [r["theta_upload"] for r in sweep]
        ys = [100 * r["accuracy"] for r in sweep]
        low = [100 * (r["accuracy"] - (r["accuracy_min"] or r["accuracy"])) for r in sweep]
        high = [100 * ((r["accuracy_max"] or r["accuracy"]) - r["accuracy"]) for r in sweep]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4, label="DSSGD (mean, min–max of participants)")
    for r in rows:
        if r["protocol"] == "dssgd" and r["dpsgd"]:
            ax.plot([r["theta_upload"]], [100 * r["accuracy"]], marker="s", linestyle="none", color="tab:red", label=r["label"])
    styles = {"centralized": ("tab:green", "--"), "standalone": ("tab:gray", ":")}
    for r in rows:
        if r["protocol"] in styles:
            color, style = styles[r["protocol"]]
            ax.axhline(100 * r["accuracy"], color=color, linestyle=style, label=f"{r['label']} ({100 * r['accuracy']:.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("θu (fraction of parameters uploaded per round)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")  # the DP point sits low on the right
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def previous_sweep_wall(path: Path, rows: list[dict]) -> float | None:
    """Re-collecting the same runs keeps the sweep's measured wall time."""
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    same = sorted(r["run"] for r in previous.get("rows", [])) == sorted(r["run"] for r in rows)
    return previous.get("meta", {}).get("sweep_wall_s") if same else None


def run_dirs_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p / "summary.json").exists())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run `graftfl sim -m experiment=ko_table4` first")
    parser.add_argument("--runs", type=Path, nargs="*", default=None, help="run directories, or folders of them (default: runs/ko_table4)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where ko_table4.{md,json,png} go")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for --run (e.g. rounds=5 dataset=svhn model=cnn)")
    args = parser.parse_args(argv)
    sweep_wall = None
    if args.run:
        run_dirs, sweep_wall = run_sweep(args.overrides)
    else:
        folders = args.runs or [ROOT / "runs" / "ko_table4"]
        run_dirs = [d for f in folders for d in ([f] if (f / "summary.json").exists() else run_dirs_under(f))]
    if not run_dirs:
        print("no finished runs found", file=sys.stderr)
        return 1
    rows = latest_per_arm([load_run(d) for d in run_dirs])
    checks = targets(rows)
    sweep_wall = sweep_wall or previous_sweep_wall(args.out / f"{NAME}.json", rows)
    config = load_run(run_dirs[-1])["config"]
    meta = {
        "dataset": config["dataset"]["name"],
        "model": config["model"]["name"],
        "num_clients": config["num_clients"],
        "samples_per_client": config["partition"].get("samples_per_client"),
        "rounds": config["rounds"],
        "batch_size": config["train"]["batch_size"],
        "lr": config["train"]["lr"],
        "test_size": config["dataset"].get("test_size"),
        "command": " ".join(["graftfl sim -m experiment=ko_table4", *args.overrides]),
        "sweep_wall_s": sweep_wall,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, checks, meta)
    (args.out / f"{NAME}.md").write_text(table)
    (args.out / f"{NAME}.json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": checks}, indent=2, default=str) + "\n")
    plot(rows, args.out / f"{NAME}.png", f"{meta['dataset']}: accuracy vs θu")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
