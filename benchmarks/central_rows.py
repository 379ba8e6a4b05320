"""The centralized reference of R(N) by how many rows it draws from, beside the clients' partitions trained bare.

LeNet on Fashion-MNIST, batch 10, SGD, the benchmark's settings (``sim_throughput.py``: 2 torch
threads, deterministic kernels, graftfl's allocator setting), one process, the same
``train_round`` the clients and ``sim_throughput``'s centralized side call:

- the centralized fit of ``--clients`` x 600 rows (the union at N=100) and of its first 6,000 and
  30,000 rows, the smaller ones for as many epochs as give the same number of samples;
- the first ``--partitions`` clients' 600-row partitions trained one after another on one model,
  with no Flower (what an in-process client computes, without its messages).

The figures are samples/s, interleaved repetitions, the median reported. On this VM a fit of the
60,000 rows ran 20-25% below one of 6,000 rows in some hours and level with it in others, which
moves R(N) at 600 images per client, N=100, by as much. ``--flush-denormal`` measures the same with
denormal floats flushed to zero: the gap is denormal arithmetic in the longer fits.

    python benchmarks/central_rows.py

Writes docs/benchmarks/central_rows.{json,md} (``--flush-denormal``: central_rows_ftz.{json,md}).
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone

import torch

from common import write_results
from graftfl.config import resolve_job_config
from graftfl.core.allocator import keep_freed_memory
from graftfl.core.denormals import flush_denormals
from graftfl.core.data import dataset_from_config
from graftfl.core.local_round import partition_data, train_round
from graftfl.core.models import model_from_config
from graftfl.core.train import deterministic_kernels

PER_CLIENT = 600


def timed_fit(cfg, x: torch.Tensor, y: torch.Tensor, rows: int, samples: int) -> float:
    """Samples/s of a centralized fit of ``samples`` samples drawn from the first ``rows`` rows."""
    torch.manual_seed(0)
    model = model_from_config(cfg, tuple(x.shape[1:]), 10)
    started = time.perf_counter()
    for epoch in range(samples // rows):
        train_round(model, x[:rows], y[:rows], cfg, seed=epoch, device=torch.device("cpu"))
    return samples / (time.perf_counter() - started)


def timed_partitions(cfg, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Samples/s of the partitions trained one after another on one model (one local epoch each)."""
    torch.manual_seed(0)
    model = model_from_config(cfg, tuple(parts[0][0].shape[1:]), 10)
    started = time.perf_counter()
    for pid, (x, y) in enumerate(parts):
        train_round(model, x, y, cfg, seed=pid, device=torch.device("cpu"))
    return sum(len(y) for _, y in parts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=30, help="how many partitions the bare loop trains")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flush-denormal", action="store_true",
                        help="flush_denormal=true (graftfl.core.denormals) first: denormal floats become zero (other numerics than graftfl's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flush_denormals(args.flush_denormal)
    deterministic_kernels()
    keep_freed_memory()
    cfg = resolve_job_config([f"num_clients={args.clients}", "dataset=fashion_mnist", "model=lenet", "device=cpu",
                              f"partition.samples_per_client={PER_CLIENT}", "train.batch_size=10", "seed=0"])
    data = dataset_from_config(cfg.dataset)
    parts = [partition_data(data, cfg, pid) for pid in range(args.clients)]
    x, y = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
    union = len(y)
    sizes = [size for size in (6000, union // 2, union) if size <= union]
    timed_partitions(cfg, parts[:2])  # warm-up
    rates: dict[str, list[float]] = {f"centralized, {size:,} rows": [] for size in sizes}
    rates[f"{args.partitions} partitions of {PER_CLIENT}, bare loop"] = []
    for _ in range(args.repeats):
        for size in sizes:
            rates[f"centralized, {size:,} rows"].append(timed_fit(cfg, x, y, size, union))
        rates[f"{args.partitions} partitions of {PER_CLIENT}, bare loop"].append(timed_partitions(cfg, parts[: args.partitions]))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    reference = medians[f"centralized, {sizes[0]:,} rows"]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Centralized reference by rows drawn from",
        "",
        f"Measured {stamp}; LeNet / Fashion-MNIST, batch 10, {args.threads} torch threads, {args.repeats} interleaved "
        f"repetitions (median), denormal floats {'flushed to zero' if args.flush_denormal else 'kept (torch default)'}. "
        f"Command: `python benchmarks/central_rows.py{' --flush-denormal' if args.flush_denormal else ''}`.",
        "",
        f"| what | samples/s | vs {sizes[0]:,} rows | all repetitions |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {name} | {medians[name]:,.0f} | {medians[name] / reference:.2f} | {', '.join(f'{v:,.0f}' for v in values)} |"
              for name, values in rates.items()]
    name = "central_rows_ftz" if args.flush_denormal else "central_rows"
    write_results(name, {"measured": stamp, "threads": args.threads, "flush_denormal": args.flush_denormal, "samples_per_s": rates,
                         "median": medians},
                  "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
