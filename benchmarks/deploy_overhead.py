"""Where a `graftfl deploy-local` round's time goes, against Flower's own message floor (issue 15).

1. **Cold start of one ClientApp message**, in fresh processes (what Flower's ``flwr-clientapp``
   pays for every message): interpreter start, Flower's ClientApp runtime import,
   ``graftfl.clients.app`` import, the protocol's client module, data load, model build, and
   the compute itself (one local round of training; the server's evaluation), plus the
   largest imports under ``python -X importtime``.
2. **Flower's message floor**: a trivial echo ClientApp/ServerApp (``benchmarks/flower_echo``)
   in the same local deployment (``LocalDeployment``: a SuperLink and N SuperNodes on
   loopback), one 16 KB message per node per round, with Flower's defaults
   (``--isolation subprocess``, SuperExec task poll 1 s, the Grid's 3 s reply pull).
3. **graftfl per round**: ``deploy_local`` fedavg on digits, N clients, in each isolation
   mode; seconds per round from ``metrics.jsonl`` (``wall_s``), minus the compute measured in 1.

Writes docs/benchmarks/deploy_overhead.{json,md}. A few minutes on 2 cores:

    /work/wt/heavy env PYTHONPATH=$PWD .venv/bin/python benchmarks/deploy_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_results

ECHO_APP = ROOT / "benchmarks" / "flower_echo"
BASE = ["protocol=fedavg", "dataset=digits", "progress=false"]

# One ClientApp message's work, phase by phase, in a fresh interpreter (OMP threads as deploy-local sets them).
CHILD = r"""
import json, sys, time
marks = {"start": time.perf_counter()}
import flwr.supernode.runtime.run_clientapp
marks["flower_runtime"] = time.perf_counter()
import graftfl.clients.app
marks["graftfl_app"] = time.perf_counter()
import graftfl.clients.fedavg
from graftfl.clients.utils import local_data, local_train, num_classes_of
from graftfl.config import resolve_job_config
from graftfl.core.models import model_from_config
marks["protocol_module"] = time.perf_counter()
from flwr.app import Context, RecordDict
cfg = resolve_job_config(sys.argv[2:])
nodes = int(cfg.num_clients)
context = Context(run_id=1, node_id=1, node_config={"partition-id": int(sys.argv[1]), "num-partitions": nodes},
                  state=RecordDict(), run_config={})
marks["config"] = time.perf_counter()
x, y = local_data(cfg, context)
classes = num_classes_of(cfg, context)
marks["data_load"] = time.perf_counter()
model = model_from_config(cfg, x.shape[1:], classes)
marks["model_build"] = time.perf_counter()
local_train(model, x, y, cfg, context, seed=1)
marks["first_train"] = time.perf_counter()  # includes torch's one-time FlopCounterMode imports
model = model_from_config(cfg, x.shape[1:], classes)
marks["model_build_again"] = time.perf_counter()
local_train(model, x, y, cfg, context, seed=1)
marks["train"] = time.perf_counter()  # the compute of a local round
from graftfl.core.data import dataset_from_config
from graftfl.core.train import evaluate
data = dataset_from_config(cfg.dataset)
marks["server_data"] = time.perf_counter()
import torch
evaluate(model, data.test_x, data.test_y, device=torch.device("cpu"), batch_size=cfg.eval.batch_size, num_classes=data.num_classes)
marks["server_eval"] = time.perf_counter()
names = list(marks)
print(json.dumps({b: marks[b] - marks[a] for a, b in zip(names, names[1:])}))
"""
PHASES = ["flower_runtime", "graftfl_app", "protocol_module", "config", "data_load", "model_build", "first_train",
          "model_build_again", "train", "server_data", "server_eval"]


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}


def cold_start(overrides: list[str], repeats: int, threads: int) -> dict:
    """Median seconds of each phase of one message in a fresh process, and of a bare interpreter start."""
    runs, bare = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=child_env(threads))
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, str(repeat % 2), *overrides], check=True, capture_output=True,
                              text=True, env=child_env(threads), cwd=ROOT)
        phases = json.loads(done.stdout.strip().splitlines()[-1])
        phases["process_wall"] = time.perf_counter() - started
        runs.append(phases)
    median = {name: statistics.median(run[name] for run in runs) for name in [*PHASES, "process_wall"]}
    median["interpreter_start"] = statistics.median(bare)
    return {"median": median, "runs": runs, "interpreter_start_runs": bare}


def import_profile(top: int = 12) -> list[dict]:
    """The largest cumulative imports of ``graftfl.clients.app`` + ``graftfl.clients.fedavg`` (``python -X importtime``)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import graftfl.clients.app, graftfl.clients.fedavg"],
                          check=True, capture_output=True, text=True, env=child_env(1), cwd=ROOT)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cumulative, name = line.split(":", 1)[1].split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append({"module": name.strip(), "depth": depth, "cumulative_s": int(cumulative) / 1e6})
    total = sum(row["cumulative_s"] for row in rows if row["depth"] == 0)
    shallow = [row for row in rows if row["depth"] <= 2]
    return [{"module": "(all)", "depth": 0, "cumulative_s": total}] + sorted(shallow, key=lambda r: -r["cumulative_s"])[:top]


def echo_floor(nodes: int, rounds: int, isolation: str, poll: str, prompt: bool) -> dict:
    """Round-trip seconds of the echo app on a fresh local deployment."""
    from graftfl.deploy.isolation import TASK_POLL_ENV
    from graftfl.deploy.local import LocalDeployment

    workdir = Path(tempfile.mkdtemp(prefix="graftfl-echo-"))
    out = workdir / "echo.json"
    saved = os.environ.get(TASK_POLL_ENV)
    os.environ[TASK_POLL_ENV] = poll
    deployment = LocalDeployment(workdir, num_nodes=nodes, isolation=isolation)
    try:
        deployment.start_superlink()
        deployment.start_supernodes()
        deployment.run_app(f"rounds={rounds} nodes={nodes} payload=16384 out={out} prompt={int(prompt)}", timeout=600,
                           project=ECHO_APP)
        if not out.exists():
            raise RuntimeError("the echo ServerApp wrote no result (logs kept)" + deployment.log_report())
        seconds = json.loads(out.read_text())["round_seconds"]
        shutil.rmtree(workdir, ignore_errors=True)
    finally:
        deployment.stop()
        if saved is None:
            os.environ.pop(TASK_POLL_ENV, None)
        else:
            os.environ[TASK_POLL_ENV] = saved
    return {"isolation": isolation, "task_poll_s": float(poll), "reply_pull_s": 0.2 if prompt else 3.0,
            "round_seconds": seconds, "median_s": statistics.median(seconds), "min_s": min(seconds)}


def graftfl_rounds(nodes: int, rounds: int, isolation: str) -> dict:
    """Seconds per round of deploy-local fedavg (``wall_s`` in metrics.jsonl) with ``isolation``."""
    from graftfl.config import resolve_job_config
    from graftfl.deploy.local import deploy_local

    overrides = [*BASE, f"num_clients={nodes}", f"rounds={rounds}"]
    cwd = Path(tempfile.mkdtemp(prefix="graftfl-deploy-bench-"))
    here = Path.cwd()
    os.chdir(cwd)
    started = time.monotonic()
    try:
        run_dir = Path(cwd, deploy_local(resolve_job_config(overrides), overrides, timeout=900, isolation=isolation))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finally:
        os.chdir(here)
    seconds = [row["wall_s"] for row in rows]
    return {"isolation": isolation, "round_seconds": seconds, "median_s": statistics.median(seconds),
            "accuracy": [row.get("accuracy") for row in rows], "command_s": time.monotonic() - started,
            "run_dir": str(run_dir)}


def same_weights(run_dirs: list[str]) -> bool:
    """Whether every run ended with bit-identical weights (seeded CPU runs must, whatever the isolation)."""
    import torch

    models = [torch.load(Path(run_dir) / "checkpoint.pt", weights_only=False)["model"] for run_dir in run_dirs]
    return all(set(model) == set(models[0]) and all(torch.equal(model[key], models[0][key]) for key in model) for model in models)


def report(result: dict) -> str:
    cold, floor, runs = result["cold_start"]["median"], result["floor"], result["graftfl"]
    compute = result["compute_s"]
    flower = floor[0]["median_s"]
    lines = [
        "# Deploy-local overhead per round vs Flower's message floor",
        "",
        f"Measured {result['when']} on {result['machine_note']}; load average before/after: "
        f"{result['load'][0]:.1f} / {result['load'][1]:.1f}. Command: "
        "`/work/wt/heavy env PYTHONPATH=$PWD .venv/bin/python benchmarks/deploy_overhead.py`.",
        f"fedavg, digits (`small_cnn`), {result['nodes']} clients, {result['rounds']} rounds; the echo app sends "
        f"{result['nodes']} × 16 KB messages per round.",
        "",
        "## Per round",
        "",
        "| setting | median s/round | min | rounds (s) | minus compute | vs Flower's floor |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for entry in floor:
        name = (f"Flower echo app, `--isolation {entry['isolation']}`, task poll {entry['task_poll_s']:g} s, "
                f"reply pull {entry['reply_pull_s']:g} s")
        lines.append(f"| {name} | {entry['median_s']:.2f} | {entry['min_s']:.2f} | "
                     f"{', '.join(f'{s:.1f}' for s in entry['round_seconds'])} | – | {entry['median_s'] / flower:.2f}× |")
    for entry in runs:
        overhead = entry["median_s"] - compute
        lines.append(f"| graftfl deploy-local `--isolation {entry['isolation']}` | {entry['median_s']:.2f} | "
                     f"{min(entry['round_seconds']):.2f} | {', '.join(f'{s:.1f}' for s in entry['round_seconds'])} | "
                     f"{overhead:.2f} | {overhead / flower:.2f}× |")
    lines += [
        "",
        f"Every isolation mode ended with bit-identical weights: **{result['same_weights']}** "
        f"(accuracy per round: {', '.join(str(run['isolation']) + ' ' + str(run['accuracy']) for run in runs)}).",
        "",
        f"Compute per round (measured in a fresh process: phase `train`, a second local round after the first paid "
        f"torch's one-time imports, of the slower partition, plus the server's evaluation): **{compute:.2f} s**. Goal: graftfl's s/round minus compute ≤ 2 × Flower's floor "
        f"({2 * flower:.2f} s).",
        "",
        "## One ClientApp message from a cold process (median of fresh processes)",
        "",
        "| phase | s |",
        "|---|---:|",
        f"| interpreter start (`python -c pass`) | {cold['interpreter_start']:.2f} |",
    ]
    lines += [f"| {name.replace('_', ' ')} | {cold[name]:.2f} |" for name in PHASES]
    lines += [f"| whole process (wall) | {cold['process_wall']:.2f} |", "", "## Largest imports of the ClientApp",
              "", "| module | cumulative s |", "|---|---:|"]
    lines += [f"| {'  ' * row['depth']}{row['module']} | {row['cumulative_s']:.2f} |" for row in result["imports"]]
    lines += ["", "## Polling intervals on a message's path (Flower 1.41)", "", "| where | interval | settable |", "|---|---|---|"]
    lines += [f"| {where} | {interval} | {settable} |" for where, interval, settable in result["polling"]]
    return "\n".join(lines) + "\n"


POLLING = [
    ("SuperNode: ask the SuperLink for a message when idle", "3 s (hard-coded `time.sleep(3)`)", "no"),
    ("SuperNode: wait for the ClientApp's reply", "0.5 s (hard-coded)", "no"),
    ("SuperExec: ask the SuperNode for a task", "1 s", "`FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (deploy-local: 0.1 s)"),
    ("ServerApp Grid: pull replies in `send_and_receive`", "3 s (hard-coded)",
     "graftfl's deployed ServerApp wraps the Grid (`PromptGrid`): 0.2 s"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--floor-rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes for the cold-start breakdown")
    parser.add_argument("--isolations", default="subprocess,warm")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    load_before = os.getloadavg()[0]
    threads = max(1, (os.cpu_count() or 1) // (args.nodes + 1))  # what deploy-local gives each co-located process
    overrides = [*BASE, f"num_clients={args.nodes}"]
    cold = cold_start(overrides, args.repeats, threads)
    per_partition = [run["train"] for run in cold["runs"]]
    compute = max(per_partition) + statistics.median(run["server_eval"] for run in cold["runs"])
    floor = [echo_floor(args.nodes, args.floor_rounds, "subprocess", "1.0", prompt=False),
             echo_floor(args.nodes, args.floor_rounds, "process", "0.1", prompt=True)]
    runs = [graftfl_rounds(args.nodes, args.rounds, isolation) for isolation in args.isolations.split(",")]
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine_note": f"{os.cpu_count()} CPU cores, CPU only (torch threads per process: {threads})",
        "load": [load_before, os.getloadavg()[0]], "nodes": args.nodes, "rounds": args.rounds,
        "cold_start": cold, "imports": import_profile(), "compute_s": compute, "floor": floor, "graftfl": runs,
        "polling": POLLING, "same_weights": same_weights([run["run_dir"] for run in runs]),
    }
    for run in runs:  # each deploy-local run had a temporary working directory of its own: <cwd>/runs/<id>
        shutil.rmtree(Path(run["run_dir"]).parents[1], ignore_errors=True)
    write_results("deploy_overhead", result, report(result))


if __name__ == "__main__":
    main()
