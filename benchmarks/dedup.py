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

from common import write_results

from graftfl.core.dedup import DedupConfig, DedupSite, Transcript, run_pairwise_dedup

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


def psi_operations(n: int) -> dict[str, float]:
    """Seconds of each openmined-psi operation on ``n`` elements against ``n`` (one process, one core)."""
    import private_set_intersection.python as psi

    server_items = [f"s{i:064d}" for i in range(n)]
    client_items = [f"s{i:064d}" for i in range(n // 2, n // 2 + n)]
    client, server = psi.client.CreateWithNewKey(True), psi.server.CreateWithNewKey(True)
    out: dict[str, float] = {}

    def timed(name, call):
        started = time.perf_counter()
        result = call()
        out[name] = round(time.perf_counter() - started, 2)
        return result

    request = timed("request (client blinds n)", lambda: client.CreateRequest(client_items))
    response = timed("response (server re-blinds n)", lambda: server.ProcessRequest(request))
    for name, structure in (("raw", psi.DataStructure.RAW), ("gcs", psi.DataStructure.GCS)):
        setup = timed(f"setup {name} (server blinds n)", lambda structure=structure: server.CreateSetupMessage(1e-9, n, server_items, structure))
        found = timed(f"finish {name} (client unblinds n, looks up)", lambda setup=setup: client.GetIntersection(setup, response))
        assert len(found) == n // 2
    started = time.perf_counter()
    DedupSite(site_ids(0, n), SALT)
    out["site keys (normalize + HMAC n)"] = round(time.perf_counter() - started, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20_000, help="identifiers per site for the scaling points")
    parser.add_argument("--large", type=int, default=100_000, help="identifiers per site for the 3-site point")
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--repeats", type=int, default=1, help="runs per point (median, min and max reported)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workers = os.cpu_count() or 1
    points = []
    operations = psi_operations(args.large)
    print(operations, flush=True)
    specs = [(num_sites, args.small, "raw") for num_sites in args.sites] + [(3, args.large, "raw"), (3, args.large, "gcs")]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pool.submit(DedupSite, ["warm-up"], SALT).result()
        for num_sites, n, structure in specs:
            runs = [run_point(num_sites, n, structure, pool) for _ in range(args.repeats)]
            walls = sorted(run["wall_s"] for run in runs)
            point = {**runs[0], "wall_s": float(np.median(walls)), "wall_s_runs": [run["wall_s"] for run in runs],
                     "site_step_seconds_sum": float(np.median([run["site_step_seconds_sum"] for run in runs]))}
            points.append(point)
            print(point, flush=True)
    lines = [
        "# Cross-site de-duplication: pairwise ECDH PSI (openmined-psi)",
        "",
        (f"Written by `benchmarks/dedup.py` on {workers} CPU cores shared with other work; each site a worker process rebuilt "
         "from its secret state at every step, the sites of one step in parallel. 10% of each site's identifiers come from a "
         "shared pool. `wall s` is the whole phase (3 relayed steps), median of the runs (all runs in brackets), without "
         "Flower's message latency (~6 s per step in a loopback deployment, 0.1 s in simulation). `site-step s` is the sum of "
         "the sites' busy time. Bytes: `relayed` = PSI payload per pair (request + setup + response) summed; `down`/`up` = "
         "everything the server sent / received. Every point's overlaps and drops match the truth."),
        "",
        "| sites | ids/site | setup | pairs | wall s | site-step s | relayed MB | down MB | up MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        runs = ", ".join(str(wall) for wall in point["wall_s_runs"])
        lines.append(
            f"| {point['sites']} | {point['ids_per_site']:,} | {point['data_structure']} | {point['pairs']} | {point['wall_s']:.1f} ({runs}) | "
            f"{point['site_step_seconds_sum']:.1f} | {point['bytes_relayed'] / 1e6:.1f} | {point['bytes_down'] / 1e6:.1f} | {point['bytes_up'] / 1e6:.1f} |"
        )
    lines += [
        "",
        f"One PSI operation on {args.large:,} elements (one core, seconds):",
        "",
        "| operation | s |",
        "|---|---:|",
        *(f"| {name} | {seconds} |" for name, seconds in operations.items()),
        "",
        ("How it grows with S sites of n ids: every site but the last blinds its set once as PSI server (setup), every "
         "site but the first once as PSI client (request); each of the S(S-1)/2 pairs costs one re-blinding of the "
         "client's set (response) and one unblinding (finish). Total work and bytes therefore grow as S(S-1)/2 pairs, each "
         "~35 bytes x (2 n_client + n_server) with `raw` (~6 bytes per server element with `gcs`). On this machine all "
         "sites share 2 cores, so the wall time follows the total work; in a deployment each site computes on its own "
         "machine and the wall time follows the busiest site: rank 0 serves S-1 requests and the last site finishes S-1 "
         "pairs, i.e. it grows linearly in S."),
    ]
    table = "\n".join(lines) + "\n"
    if args.no_write:
        print(table)
    else:
        write_results("dedup", {"points": points, "psi_operations_s": operations, "target_s_3x100k": 60,
                                "salt_note": "fixed public salt (benchmark only)"}, table)


if __name__ == "__main__":
    main()
