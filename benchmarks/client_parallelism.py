"""SGD steps per second of one model in one thread against two models in two threads, on the same cores.

Why ``sim.client_workers`` exists: a small model's step at a small batch does not keep two cores busy
through torch's intra-op threads, while two clients' steps in two threads (one torch thread each) do.
For each model (LeNet on 1x28x28, the CNN of pfl-research's CIFAR-10 workload on 3x32x32), batch 10,
SGD with momentum: steps/s of one model with ``--threads`` torch threads and with one, and the steps/s of
``--threads`` models trained at once, one thread each (the layout of ``sim.client_workers``). Each layout
is timed ``--repeats`` times, interleaved; the medians are reported.

    python benchmarks/client_parallelism.py

Writes docs/benchmarks/client_parallelism.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from common import write_results
from graftfl.config import resolve_job_config
from graftfl.core.allocator import keep_freed_memory
from graftfl.core.models import model_from_config

SHAPES = {"lenet": (1, 28, 28), "cnn": (3, 32, 32)}


def new_model(model_name: str) -> torch.nn.Module:
    return model_from_config(resolve_job_config([f"model={model_name}"]), SHAPES[model_name], 10)


def train_steps(model: torch.nn.Module, shape: tuple[int, ...], steps: int, threads: int, batch: int) -> None:
    """``steps`` SGD steps of ``model`` in the calling thread, with ``threads`` torch threads."""
    torch.get_num_threads()  # this thread's first torch call takes the process default; set ours after it
    torch.set_num_threads(threads)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(100 * batch, *shape), torch.randint(0, 10, (100 * batch,))
    for step in range(steps):
        rows = slice((step % 100) * batch, (step % 100 + 1) * batch)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()


def timed(layout: str, model_name: str, steps: int, threads: int, batch: int) -> float:
    """Steps per second of ``layout``: ``one`` model with ``threads`` threads, ``one-1`` with one, ``side-by-side``."""
    shape = SHAPES[model_name]
    if layout == "side-by-side":
        models = [new_model(model_name) for _ in range(threads)]  # built before the clock starts, as a worker's is kept
        workers = [threading.Thread(target=train_steps, args=(model, shape, steps // threads, 1, batch)) for model in models]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    else:
        model = new_model(model_name)
        started = time.perf_counter()
        train_steps(model, shape, steps, threads if layout == "one" else 1, batch)
    return steps / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs=2, default=[600, 100], help="steps per timing: LeNet, CNN")
    args = parser.parse_args()
    keep_freed_memory()
    main_threads = torch.get_num_threads()
    layouts = ("one", "one-1", "side-by-side")
    rows = []
    for model_name, steps in zip(SHAPES, args.steps, strict=True):
        train_steps(new_model(model_name), SHAPES[model_name], 20, args.threads, args.batch_size)  # warm-up
        rates: dict[str, list[float]] = {layout: [] for layout in layouts}
        for _ in range(args.repeats):
            for layout in layouts:
                rates[layout].append(timed(layout, model_name, steps, args.threads, args.batch_size))
                torch.set_num_threads(main_threads)
        medians = {layout: statistics.median(values) for layout, values in rates.items()}
        rows.append({"model": model_name, "steps_per_s": medians, "all_steps_per_s": rates,
                     "side_by_side_over_one": medians["side-by-side"] / medians["one"]})
    lines = [
        "# Client parallelism: one model's SGD steps against several models side by side",
        "",
        f"Command: `python {' '.join(sys.argv)}`. Batch {args.batch_size}, SGD momentum 0.9, "
        f"{args.threads} cores' worth of torch threads; medians of {args.repeats} interleaved timings.",
        "",
        f"| model | one model, {args.threads} threads (steps/s) | one model, 1 thread | {args.threads} models side by side, 1 thread each | "
        "side by side / one model |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['steps_per_s']['one']:.0f} | {r['steps_per_s']['one-1']:.0f} | {r['steps_per_s']['side-by-side']:.0f} | "
              f"{r['side_by_side_over_one']:.2f} |" for r in rows]
    payload = {"command": "python " + " ".join(sys.argv), "threads": args.threads, "batch_size": args.batch_size,
               "torch": torch.__version__, "results": rows}
    write_results("client_parallelism", payload, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
