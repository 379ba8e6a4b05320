"""Cross-site de-duplication (pairwise ECDH PSI): seconds and bytes against sites and set size.

Each site is a separate worker process, rebuilt from its secret state for every step
(as a deployment starts a fresh ClientApp per message); the sites of one step run in
parallel on the machine's cores, the steps one after another, as the relaying server
would drive them. Identifiers: ``n`` per site, 10% drawn from a pool shared by all
sites (pairwise and many-way overlaps), the rest unique; the overlap the phase finds is
checked against the truth.

    /work/wt/heavy env PYTHONPATH=$PWD .venv/bin/python benchmarks/dedup.py

Writes docs/benchmarks/dedup.json and docs/benchmarks/dedup.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import write_results  # noqa: E402
from graftfl.core.dedup import DedupConfig, DedupSite, Transcript, run_pairwise_dedup  # noqa: E402

SALT = "benchmark-salt-not-secret-0123456789"
SHARED_FRACTION = 0.1


def site_ids(rank: int, n: int, seed: int = 0) -> list[str]:
    """``n`` identifiers: 10% from a shared pool twice that size, the rest unique to the site."""
    rng = np.random.default_rng([seed, rank])
    shared = int(n * SHARED_FRACTION)
    pool = rng.choice(2 * shared, size=shared, replace=False)
    return [f"MRN-C{k:08d}" for k in pool] + [f"MRN-S{rank}-{k:08d}" for k in range(n - shared)]


def _site_step(rank: int, n: int, structure: str, state: dict | None, message: dict) -> tuple[dict, dict, float]:
    started = time.perf_counter()
    site = DedupSite(site_ids(rank, n), SALT, DedupConfig(data_structure=structure), secret_state=state)
    reply = site.handle(message)
    return reply, site.secret_state(), time.perf_counter() - started


def run_point(num_sites: int, n: int, structure: str, pool: ProcessPoolExecutor) -> dict:
    states: dict[int, dict | None] = dict.fromkeys(range(num_sites))
    busy = {"cpu_seconds": 0.0}

    def deliver(batch: dict[int, dict]) -> dict[int, object]:
        futures = {rank: pool.submit(_site_step, rank, n, structure, states[rank], message) for rank, message in batch.items()}
        replies = {}
        for rank, future in futures.items():
            try:
                reply, states[rank], seconds = future.result()
                busy["cpu_seconds"] += seconds
                replies[rank] = reply
            except Exception as error:  # noqa: BLE001 - reported as a failed site
                replies[rank] = error
        return replies

    transcript = Transcript()
    started = time.perf_counter()
    report = run_pairwise_dedup([None] * num_sites, transcript, deliver=deliver)
    wall = time.perf_counter() - started
    assert report["not_checked"] == [], report["not_checked"]
    ids = [set(site_ids(rank, n)) for rank in range(num_sites)]
    for pair in report["pairs"]:
        i, j = pair["pair"]
        assert pair["overlap_patients"] == len(ids[i] & ids[j]), (pair, len(ids[i] & ids[j]))
    truth_dropped = [len(ids[j] & set().union(*ids[:j])) if j else 0 for j in range(num_sites)]
    assert [site["dropped_records"] for site in report["sites"]] == truth_dropped
    totals = report["totals"]
    return {
        "sites": num_sites, "ids_per_site": n, "data_structure": structure, "pairs": len(report["pairs"]),
        "wall_s": round(wall, 2), "site_step_seconds_sum": round(busy["cpu_seconds"], 2),
        "bytes_relayed": totals["bytes_relayed"], "bytes_up": totals["bytes_up"], "bytes_down": totals["bytes_down"],
        "overlap_total": totals["overlap_patients"], "dropped_records": totals["dropped_records"],
        "per_pair_bytes": [pair["bytes_relayed"] for pair in report["pairs"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20_000, help="identifiers per site for the scaling points")
    parser.add_argument("--large", type=int, default=100_000, help="identifiers per site for the 3-site point")
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workers = os.cpu_count() or 1
    points = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pool.submit(DedupSite, ["warm-up"], SALT).result()
        for num_sites in args.sites:
            points.append(run_point(num_sites, args.small, "raw", pool))
            print(points[-1], flush=True)
        for structure in ("raw", "gcs"):
            points.append(run_point(3, args.large, structure, pool))
            print(points[-1], flush=True)
    lines = [
        "# Cross-site de-duplication: pairwise ECDH PSI (openmined-psi)",
        "",
        f"Written by `benchmarks/dedup.py` on {workers} CPU cores; each site a worker process rebuilt from its secret "
        "state at every step, the sites of one step in parallel. 10% of each site's identifiers come from a shared pool. "
        "`wall s` is the whole phase (3 relayed steps), without Flower's message latency (~6 s per step in a loopback "
        "deployment, 0.1 s in simulation). Bytes: `relayed` = PSI payload per pair (request + setup + response) summed; "
        "`down`/`up` = everything the server sent / received. Every point's overlaps match the truth.",
        "",
        "| sites | ids/site | setup | pairs | wall s | site-step s (sum) | relayed MB | down MB | up MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        lines.append(
            f"| {point['sites']} | {point['ids_per_site']:,} | {point['data_structure']} | {point['pairs']} | {point['wall_s']} | "
            f"{point['site_step_seconds_sum']} | {point['bytes_relayed'] / 1e6:.1f} | {point['bytes_down'] / 1e6:.1f} | {point['bytes_up'] / 1e6:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    if args.no_write:
        print(table)
    else:
        write_results("dedup", {"points": points, "target_s_3x100k": 60, "salt_note": "fixed public salt (benchmark only)"}, table)


if __name__ == "__main__":
    main()
