"""The privacy table (issue 14): accuracy, cost and what the server recovers, per protocol and defence.

Every row of ``benchmarks/privacy_rows.yaml`` is one ``graftfl sim ... audit.record=true`` on the
same data and budget (``COMMON``: Fashion-MNIST, 5 sites x 1,000 images, 3 rounds) followed by
``graftfl audit --run``; every figure in the table is read from that run's ``summary.json`` and
``privacy.json``, nothing is typed by hand. A row whose overrides this checkout refuses (a
defence key not merged yet, a protocol that refuses a privacy setting) is listed as skipped
with the config error.

    /work/wt/heavy env PYTHONPATH=$PWD .venv/bin/python benchmarks/privacy_table.py            # the table
    env PYTHONPATH=$PWD .venv/bin/python benchmarks/privacy_table.py --quick                    # smoke test

Writes ``docs/benchmarks/privacy.{md,json,png}`` (``--quick``: ``runs/privacy_quick/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graftfl.config import ConfigError, compose_config  # noqa: E402

ROWS_FILE = Path(__file__).with_name("privacy_rows.yaml")
COMMON = ["dataset=fashion_mnist", "num_clients=5", "partition.samples_per_client=1000", "rounds=3", "dataset.test_size=2000", "progress=false",
          "sim.backend=inprocess"]  # in-process: the same weights as on Ray (tests/test_sim_fastpath.py), no Ray start per row
QUICK = ["dataset=digits", "num_clients=2", "rounds=1", "progress=false", "protocol.turn_batches=8"]
AUDIT = ["audit.targets=64", "audit.unsplit_tv_weight=0.5"]  # TV prior: UnSplit on 28x28 lenet conv1 0.02 -> 0.21 SSIM (guess 0.05)
QUICK_AUDIT = ["audit.unsplit_rounds=5", "audit.decoder_epochs=5", "audit.inversion_steps=50", "audit.shadows=2", "audit.shadow_epochs=2"]
COLUMNS = ("accuracy", "MB up+down per site", "client GFLOP per site", "inversion SSIM (guess)", "label-leak AUC", "membership AUC", "epsilon")


def load_rows(quick: bool) -> list[dict]:
    """The rows of ``privacy_rows.yaml`` (only ``quick: true`` ones with ``--quick``)."""
    rows = yaml.safe_load(ROWS_FILE.read_text())["rows"]
    return [row for row in rows if row.get("quick")] if quick else rows


def row_overrides(row: dict, quick: bool) -> list[str]:
    """The full override list of a row: the common budget, its own overrides, and recording on.

    ``--quick`` runs on 8x8 digits: a row keeps the dataset's own model and cut (the per-stage
    rows need 28x28 images), and ``protocol.turn_batches`` applies to the split protocols only.
    """
    if not quick:
        return [*COMMON, *row["overrides"], "audit.record=true"]
    common = [o for o in QUICK if row["protocol"] in ("split", "ushaped", "semisup") or not o.startswith("protocol.turn_batches")]
    own = [o for o in row["overrides"] if not o.startswith(("model=", "protocol.cut_stage="))]
    return [*common, *own, "audit.record=true"]


def refusal(overrides: list[str]) -> str | None:
    """Why this checkout refuses the row (a config key it does not have, a protocol's own check), or None."""
    try:
        compose_config(overrides)
    except ConfigError as err:
        return str(err).splitlines()[0][:300]
    except Exception as err:  # noqa: BLE001 - Hydra's own errors for keys that do not exist
        return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return None


def run_row(row: dict, overrides: list[str], runs_dir: Path, audit_settings: list[str]) -> dict:
    """``graftfl sim`` then ``graftfl audit`` for one row; the figures read from the run's JSON files."""
    started = time.monotonic()
    run_id = f"privacy-{row['name']}-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh folder: never resumes an old row
    command = [sys.executable, "-m", "graftfl.cli", "sim", *overrides, f"output_dir={runs_dir}", f"run_id={run_id}"]
    env = {**os.environ, **{name: str(value) for name, value in (row.get("env") or {}).items()}}  # a row's site-side settings
    sim = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if sim.returncode != 0:
        return {"status": "failed", "why": f"graftfl sim failed: {sim.stderr.strip()[-600:]}"}
    run_dir = runs_dir / run_id
    audit = subprocess.run([sys.executable, "-m", "graftfl.cli", "audit", "--run", str(run_dir), *audit_settings], cwd=ROOT, capture_output=True,
                           text=True, env=env)
    if audit.returncode != 0:
        return {"status": "failed", "why": f"graftfl audit failed: {audit.stderr.strip()[-600:]}", "run": str(run_dir)}
    return {"status": "ok", "run": str(run_dir), "seconds": round(time.monotonic() - started, 1), **figures_of(run_dir)}


def figures_of(run_dir: Path) -> dict:
    """The table's figures of one audited run, from ``summary.json`` and ``privacy.json``."""
    summary = json.loads((run_dir / "summary.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    sites = int(summary["num_clients"])
    figures = privacy["summary"]
    return {
        "accuracy": summary.get("accuracy"),
        "mb_per_site": (summary["bytes_up"] + summary["bytes_down"]) / sites / 1e6,
        "client_gflop_per_site": summary["client_flops"] / sites / 1e9,
        "inversion_ssim": figures["inversion_ssim"],
        "inversion_guess_ssim": figures["inversion_guess_ssim"],
        "label_auc": figures["label_auc"],
        "membership_auc": figures["membership_auc"],
        "epsilon": figures["epsilon"] if figures["epsilon"] is not None else summary.get("epsilon"),
        "audit_seconds": privacy.get("seconds"),
    }


def _cell(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results: list[dict], setting: str) -> str:
    """The table: measured rows first, then skipped or failed rows with their reason."""
    lines = ["# Privacy audit: accuracy, cost and leakage per protocol", "", setting, "",
             "| row | protocol | defence | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 3)]
    for result in (r for r in results if r["status"] == "ok"):
        ssim = "n/a" if result["inversion_ssim"] is None else f"{result['inversion_ssim']:.3f} ({_cell(result['inversion_guess_ssim'])})"
        lines.append(f"| {result['name']} | {result['protocol']} | {result['defence']} | {_cell(result['accuracy'])} | {_cell(result['mb_per_site'], 2)} | "
                     f"{_cell(result['client_gflop_per_site'], 2)} | {ssim} | {_cell(result['label_auc'])} | {_cell(result['membership_auc'])} | "
                     f"{_cell(result['epsilon'], 2)} |")
    others = [r for r in results if r["status"] != "ok"]
    if others:
        lines += ["", "Not measured:", ""] + [f"- **{r['name']}** ({r['status']}): {r['why']}" for r in others]
    lines += ["", "Columns: accuracy is the run's final `accuracy` (summary.json); MB and GFLOP are the run's totals divided by the "
              "sites; inversion SSIM is the best attack of `privacy.json` (UnSplit or shadow bottom for split protocols, the "
              "server's decoder or a shadow encoder for features, analytic / restricted gradient inversion for DSSGD) with the "
              "random-guess SSIM beside it; label-leak AUC is the U-shaped gradient attack or, for split, the labels the server "
              "receives; membership AUC is the best of loss threshold and offline LiRA on the final global model (n/a where the "
              "server does not hold the whole model). See docs/audit.md for each attack.", ""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Accuracy against the inversion's SSIM gain over a random guess and against label / membership AUC, one marker per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r["status"] == "ok" and r["accuracy"] is not None]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("ssim_gain", "inversion SSIM minus random-guess SSIM (higher: more leakage)"), ("leak_auc", "label-leak or membership AUC"))
    protocols = sorted({r["protocol"] for r in measured})
    colours = {p: plt.cm.tab10(i) for i, p in enumerate(protocols)}
    for axis, (key, label) in zip(axes, panels, strict=True):
        for r in measured:
            if key == "ssim_gain":
                x = None if r["inversion_ssim"] is None else r["inversion_ssim"] - (r["inversion_guess_ssim"] or 0.0)
            else:
                x = r["label_auc"] if r["label_auc"] is not None else r["membership_auc"]
            if x is None:
                continue
            axis.scatter(x, r["accuracy"], color=colours[r["protocol"]], marker="o" if r["defence"] == "none" else "x")
            axis.annotate(r["name"], (x, r["accuracy"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel(label)
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    figure.suptitle("accuracy vs leakage (o: undefended, x: defended)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def earlier_rows(path: Path, rerun: set[str]) -> list[dict]:
    """The rows of an earlier table at ``path`` that this run does not measure again (``--rows``)."""
    if not path.exists():
        return []
    return [row for row in json.loads(path.read_text())["rows"] if row["name"] not in rerun]


def merged(kept: list[dict], measured: list[dict], order: list[dict]) -> list[dict]:
    """Earlier rows and this run's, in the order of privacy_rows.yaml."""
    by_name = {row["name"]: row for row in [*kept, *measured]}
    return [by_name[row["name"]] for row in order if row["name"] in by_name]


def write_outputs(results: list[dict], setting: str, out: Path, complete: bool) -> None:
    """Write privacy.{json,md,png} for the rows measured so far (``complete``: all the rows asked for)."""
    if not complete:
        setting += f" Partial: {len(results)} rows so far."
    (out / "privacy.json").write_text(json.dumps({"setting": setting, "complete": complete, "rows": results}, indent=1, default=float))
    plot(results, out / "privacy.png")
    (out / "privacy.md").write_text(markdown(results, setting) + "\n![accuracy vs leakage](privacy.png)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 2 sites, 1 round, the quick rows: a smoke test")
    parser.add_argument("--rows", help="comma-separated row names to run (default: all)")
    parser.add_argument("--out", type=Path, help="folder for privacy.{md,json,png} (default: docs/benchmarks; --quick: runs/privacy_quick)")
    args = parser.parse_args(argv)
    out = args.out or (ROOT / "runs" / "privacy_quick" if args.quick else ROOT / "docs" / "benchmarks")
    runs_dir = (out / "runs") if args.quick else ROOT / "runs" / "privacy_table"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.quick)
    if args.rows:
        wanted = set(args.rows.split(","))
        rows = [row for row in rows if row["name"] in wanted]
    setting = (f"Setting: `{' '.join(QUICK if args.quick else COMMON)}` for every row, plus the row's own overrides and "
               f"`audit.record=true`; audit settings `{' '.join(QUICK_AUDIT if args.quick else AUDIT)}` (the rest: conf/config.yaml `audit:`). "
               f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/privacy_table.py{' --quick' if args.quick else ''}`.")
    results = []
    kept = earlier_rows(out / "privacy.json", {row["name"] for row in rows}) if args.rows else []
    if kept:  # the table's own date stays that of its other rows
        earlier = json.loads((out / "privacy.json").read_text())["setting"].split(" Partial:")[0].split(" Measured again")[0]
        setting = f"{earlier} Measured again {time.strftime('%Y-%m-%d')} (`--rows`): {', '.join(row['name'] for row in rows)}."
    for row in rows:
        overrides = row_overrides(row, args.quick)
        why = refusal(overrides)
        base = {"name": row["name"], "protocol": row["protocol"], "defence": row["defence"], "overrides": overrides,
                **({"env": row["env"]} if row.get("env") else {})}
        if why is not None:
            results.append({**base, "status": "skipped", "why": f"this checkout refuses the overrides: {why}"})
        else:
            results.append({**base, **run_row(row, overrides, runs_dir, QUICK_AUDIT if args.quick else AUDIT)})
        print(f"[privacy] {row['name']}: {results[-1]['status']} {results[-1].get('why', '')}"[:400], flush=True)
        # after every row: a cut-short run keeps its rows; --rows replaces only those rows of the table
        write_outputs(merged(kept, results, load_rows(args.quick)), setting, out, complete=len(results) == len(rows))
    print(f"wrote {out / 'privacy.md'}, {out / 'privacy.json'}, {out / 'privacy.png'}")
    return 0 if all(r["status"] != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
