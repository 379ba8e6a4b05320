"""FedAvg on Fashion-MNIST / LeNet with 10, 50 and 100 simulated clients, and the centralized reference.

Measures seconds per round (from the run's metrics.jsonl) and the peak resident
memory of the whole process tree (driver, Ray and its workers), then trains LeNet
centrally for 2 epochs for accuracy and steps/s. Writes docs/benchmarks/fedavg_scale.{json,md}.

    python benchmarks/fedavg_scale.py [--clients 10 50 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import graftfl_command, run_measured, write_results
from graftfl.core.data import load_dataset, make_loader
from graftfl.core.models import build_model
from graftfl.core.train import evaluate, make_optimizer, seed_everything, train


def fedavg_at_scale(num_clients: int, rounds: int, workdir: Path) -> dict:
    overrides = ["protocol=fedavg", "dataset=fashion_mnist", "model=lenet", f"num_clients={num_clients}", f"rounds={rounds}", "progress=false"]
    proc, peak_rss, wall = run_measured(graftfl_command(*overrides), cwd=workdir)
    run_dir = workdir / proc.stdout.strip().splitlines()[-1].removeprefix("run: ")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    later = [row["wall_s"] for row in rows[1:]] or [rows[0]["wall_s"]]
    return {
        "clients": num_clients,
        "rounds": rounds,
        "first_round_s": rows[0]["wall_s"],
        "s_per_round": statistics.mean(later),
        "peak_rss_gb": peak_rss / 2**30,
        "accuracy": rows[-1]["accuracy"],
        "command_wall_s": wall,
    }


def centralized_reference(epochs: int = 2, batch_size: int = 64) -> dict:
    seed_everything(0)
    data = load_dataset("fashion_mnist", "data")
    model = build_model("lenet", data.input_shape, data.num_classes)
    optimizer = make_optimizer("sgd", model.parameters(), lr=0.05, momentum=0.9)
    loader = make_loader(data.train_x, data.train_y, batch_size, shuffle=True, seed=0)
    started = time.perf_counter()
    result = train(model, loader, optimizer, device=torch.device("cpu"), epochs=epochs)
    seconds = time.perf_counter() - started
    accuracy = evaluate(model, data.test_x, data.test_y, device=torch.device("cpu"))["accuracy"]
    return {"epochs": epochs, "batch_size": batch_size, "steps": result["steps"], "steps_per_s": result["steps"] / seconds, "accuracy": accuracy, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scale = [fedavg_at_scale(n, args.rounds, Path(tmp)) for n in args.clients]
    reference = centralized_reference()
    lines = [
        "# FedAvg scale (Fashion-MNIST, LeNet, simulation, 2-core CPU machine)\n",
        "| clients | s/round (rounds 2+) | first round s | peak RSS, process tree (GB) | accuracy after last round |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {r['clients']} | {r['s_per_round']:.1f} | {r['first_round_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['accuracy']:.4f} |" for r in scale],
        "",
        "Every round each client trains one local epoch on its IID share, so a round is one pass over the "
        "60,000 training images whatever the client count; with more clients each trains fewer steps before "
        "averaging, hence the lower accuracy after the same 3 rounds. Peak RSS is the driver, Ray and its "
        "workers together (Ray runs one worker per core, not one per client).",
        "",
        f"Centralized reference: LeNet, {reference['epochs']} epochs, batch {reference['batch_size']}, SGD lr 0.05 momentum 0.9: "
        f"test accuracy **{reference['accuracy']:.4f}**, **{reference['steps_per_s']:.0f} steps/s** ({reference['threads']} torch threads).\n",
    ]
    write_results("fedavg_scale", {"fedavg": scale, "centralized": reference}, "\n".join(lines))


if __name__ == "__main__":
    main()
