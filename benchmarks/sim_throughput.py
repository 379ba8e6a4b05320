"""R(N): federated training samples/s over centralized training samples/s, Ray backend beside the in-process one.

For each protocol (fedavg, split, dssgd, features' autoencoder phase), N clients per round
and simulation backend (``sim.backend=ray`` | ``inprocess``), one ``graftfl sim`` run is made in
this process (:func:`graftfl.cli.simulate`) and its fit time is taken from the run's own
metrics: the rounds' ``wall_s`` minus the time the server spent evaluating (timed here by
wrapping the evaluation functions; ``eval.where=server`` on a 100-image test subset), and for
features the ``wall_s`` of its autoencoder rows. Startup (Ray, the first wait for nodes) is
outside the rounds. The centralized side trains the same (unsplit) model with the same batch
size, optimizer, device and torch threads on the union of the clients' rows, in memory,
through the same training function the clients call. R is reported over all rounds and
over the last round only (the first round of a Ray run also pays its workers' imports and
data loading).

    python benchmarks/sim_throughput.py                       # CPU, Fashion-MNIST / LeNet, N = 10 and 100
    python benchmarks/sim_throughput.py --gpu                 # pfl-research's CIFAR-10 IID workload (needs CUDA)
    python benchmarks/sim_throughput.py --flush-denormal      # both sides with flush_denormal=true (denormal floats as zero)

Writes docs/benchmarks/sim_throughput.{json,md} (``--gpu``: sim_throughput_gpu.{json,md}; ``--flush-denormal``:
sim_throughput_ftz.{json,md}).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import statistics
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import CallClock, merge_with_existing, write_results
from sim_throughput_report import render_existing, report, with_best_central
from graftfl import cli
from graftfl.clients import dssgd as dssgd_client
from graftfl.config import resolve_job_config
from graftfl.core.allocator import keep_freed_memory
from graftfl.core.autoencoder import conv_ae, train_autoencoder
from graftfl.core.data import dataset_from_config
from graftfl.core.local_round import partition_data, train_round
from graftfl.core.models import model_from_config
from graftfl.core.denormals import flush_denormals
from graftfl.core.train import deterministic_kernels
from graftfl.strategies import split_turns, utils

CPU_PROTOCOLS = ("fedavg", "split", "dssgd", "features")
BACKENDS = ("ray", "inprocess")
PROTOCOL_ARGS = {
    "fedavg": [],
    # the server's test set through one client's bottom (one turn), not a turn at every site
    "split": ["eval.server_reveals_bottom=true"],
    # every participant trains every round (order=random: in parallel, as FedAvg)
    "dssgd": [],
    # the autoencoder phase is timed; the rest of the run (uploads, classifier, service) is kept small
    # FedAvg of the autoencoder (autoencoder.rounds rounds): a last round that a Ray worker's start does not pay for
    "features": ["protocol.autoencoder.training=federated", "protocol.latent_dim=64", "protocol.classifier.epochs=1"],
}
GPU_SYNTHETIC = "synthetic_cifar10"  # <root>/<name>.npz read through the medmnist loader (no checksum, any subset name)


def evaluation_clock(site_scoring: bool = True) -> CallClock:
    """Times the server's evaluation and DSSGD's local scoring (timed where it runs in this process: in-process backend).

    ``site_scoring=False`` leaves DSSGD's local scoring in the fit time: with clients side by side it runs beside
    another client's training, and the seconds inside it, summed over the workers, are not seconds the run lost.
    """
    targets = [(utils.ServerRun, "evaluate"), (split_turns.SplitRunner, "evaluate")]
    return CallClock(*targets, *([(dssgd_client, "local_test_metrics")] if site_scoring else []))


def overrides_for(protocol: str, clients: int, backend: str, args, workdir: Path) -> list[str]:
    common = [
        f"protocol={protocol}", f"num_clients={clients}", f"rounds={args.rounds}", "progress=false", "seed=0",
        f"train.batch_size={args.batch_size}", "train.local_epochs=1", f"client_resources.num_cpus={args.threads}",
        "eval.where=server", "dataset.test_size=100", f"sim.backend={backend}", f"output_dir={workdir / backend}",
    ] + ([f"train.lr={args.lr}"] if args.lr is not None else []) + (["flush_denormal=true"] if args.flush_denormal else [])
    if backend == "inprocess" and args.client_workers > 1:  # the same threads in all, one per worker: as Ray's actors share the cores
        common += [f"sim.client_workers={args.client_workers}", f"sim.client_threads={max(1, args.threads // args.client_workers)}"]
    if args.workload == "gpu":
        common += ["dataset=medmnist", f"dataset.subset={GPU_SYNTHETIC}", f"dataset.root={workdir}", "dataset.download=false",
                   "model=cnn", f"device={args.device}", f"client_resources.num_gpus={args.num_gpus if args.device == 'cuda' else 0}",
                   f"partition.samples_per_client={args.samples_per_client}", f"protocol.fraction_train={clients / args.population}"]
        return common
    common += ["dataset=fashion_mnist", "model=lenet", "device=cpu", f"partition.samples_per_client={args.samples_per_client}"]
    if protocol == "features":
        common += [f"protocol.autoencoder.rounds={args.rounds}", f"protocol.autoencoder.local_epochs={args.ae_epochs}",
                   f"protocol.autoencoder.batch_size={args.batch_size}", f"protocol.chunk_size={args.samples_per_client}"]
    return common + PROTOCOL_ARGS[protocol]


def federated_run(protocol: str, clients: int, backend: str, args, workdir: Path) -> dict:
    overrides = overrides_for(protocol, clients, backend, args, workdir)
    if args.workload == "gpu":
        overrides = [o for o in overrides if not o.startswith("num_clients=")] + [f"num_clients={args.population}"]
    cfg = resolve_job_config(overrides)
    started = time.perf_counter()
    side_by_side = backend == "inprocess" and args.client_workers > 1
    with evaluation_clock(site_scoring=not side_by_side) as clock:
        run_dir = cli.simulate(cfg)
    total_s = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_client = int(cfg.partition.samples_per_client)
    if protocol == "features":
        fit_rows = [row for row in rows if row.get("phase") == "autoencoder"]
        round_s = [row["wall_s"] for row in fit_rows]
        samples_per_round = clients * per_client * int(cfg.protocol.autoencoder.local_epochs)
        eval_s = 0.0
    else:
        fit_rows = rows
        eval_s = clock.seconds
        # the server evaluates once per round: spread its measured time evenly over the rounds
        round_s = [row["wall_s"] - eval_s / len(rows) for row in rows]
        samples_per_round = clients * per_client * int(cfg.train.local_epochs)
    return {
        "protocol": protocol, "clients_per_round": clients, "backend": backend, "rounds": len(fit_rows),
        "client_workers": args.client_workers if backend == "inprocess" else 1, "site_scoring_subtracted": not side_by_side,
        "samples": samples_per_round * len(fit_rows), "fit_s": sum(round_s), "last_round_s": round_s[-1],
        "samples_per_s": samples_per_round * len(fit_rows) / sum(round_s), "last_round_samples_per_s": samples_per_round / round_s[-1],
        "server_eval_s": eval_s, "command_s": total_s, "overrides": overrides, "batch_size": int(cfg.train.batch_size),
        "lr_override": args.lr,
        "final_accuracy": rows[-1].get("accuracy"),
    }


def central_fitter(protocol: str, clients: int, args, workdir: Path) -> tuple[int, Callable[[], float]]:
    """The centralized side of a configuration, warmed up: (samples per fit, a function that times one fit in seconds).

    The same model, batch size, optimizer, device and torch threads on the union of the clients' rows, in
    memory, trained through the function the clients call; one fit covers at least
    ``args.min_central_samples`` samples.
    """
    cfg = resolve_job_config(overrides_for(protocol, clients, "inprocess", args, workdir))
    data = dataset_from_config(cfg.dataset)
    x, y = map(torch.cat, zip(*(partition_data(data, cfg, pid) for pid in range(clients)), strict=True))
    device = torch.device(str(cfg.device)) if str(cfg.device) != "auto" else torch.device("cpu")
    x, y = x.to(device), y.to(device)  # data already in memory: on a GPU, the device's (the clients copy theirs each round)
    epochs = max(1, math.ceil(args.min_central_samples / len(y)))
    if protocol == "features":
        ae = cfg.protocol.autoencoder

        def fit(rows, epochs_):
            torch.manual_seed(0)
            model = conv_ae(tuple(x.shape[1:]), latent_dim=int(cfg.protocol.latent_dim), channels=int(cfg.protocol.conv_channels))
            train_autoencoder(model, x[:rows], epochs=epochs_, batch_size=int(ae.batch_size), lr=float(ae.lr), device=device, seed=0)
    else:  # split counts against the unsplit model

        def fit(rows, epochs_):
            torch.manual_seed(0)
            model = model_from_config(cfg, tuple(x.shape[1:]), data.num_classes)
            for epoch in range(epochs_):
                train_round(model, x[:rows], y[:rows], cfg, seed=epoch, device=device, history=None, show_progress=False)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fit(len(y), epochs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    fit(min(len(y), 10 * args.batch_size), 1)  # warm-up: kernels, allocator
    return len(y) * epochs, timed


def centralized_rate(samples: int, timed: Callable[[], float], repeats: int) -> dict:
    """Samples/s of the centralized side: the median of ``repeats`` timed fits (the machine may be shared, and one
    short fit is noisy)."""
    timings = [timed() for _ in range(repeats)]
    seconds = statistics.median(timings)
    return {"samples": samples, "seconds": seconds, "all_seconds": timings, "samples_per_s": samples / seconds}


def paired_runs(run_once: Callable[[], dict], samples: int, timed: Callable[[], float], repeats: int) -> dict:
    """``repeats`` federated runs, a centralized fit timed before each and after the last; the median run
    (:func:`median_run`) with R_paired: the median over the runs of each run's rate over the centralized rate of
    the two fits beside it. On a VM whose speed drifts by tens of percent within minutes, each pair sees the
    same machine, which the pooled medians (fits before and after all the runs of a key) do not promise."""
    fit_seconds = [timed()]
    runs = []
    for _ in range(repeats):
        runs.append(run_once())
        fit_seconds.append(timed())
    ratios = [run["samples_per_s"] * (before + after) / 2 / samples
              for run, before, after in zip(runs, fit_seconds[:-1], fit_seconds[1:], strict=True)]
    return {**median_run(runs), "R_paired": statistics.median(ratios), "R_paired_all": ratios,
            "paired_central_seconds": fit_seconds}


def pooled(before: dict, after: dict) -> dict:
    """One centralized rate from the fits timed before and after the federated runs (the median of all)."""
    timings = before["all_seconds"] + after["all_seconds"]
    seconds = statistics.median(timings)
    return {"samples": before["samples"], "seconds": seconds, "all_seconds": timings, "before_seconds": before["all_seconds"],
            "samples_per_s": before["samples"] / seconds}


def write_synthetic_cifar(root: Path, population: int, per_client: int) -> None:
    """pfl-research's CIFAR-10 stand-in: random 3x32x32 images with 10 labels, as a MedMNIST-style npz."""
    rng = np.random.default_rng(0)
    rows = population * per_client
    np.savez(root / f"{GPU_SYNTHETIC}.npz",
             train_images=rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8), train_labels=rng.integers(0, 10, (rows, 1)),
             test_images=rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), test_labels=rng.integers(0, 10, (1000, 1)))


def median_run(runs: list[dict]) -> dict:
    """The federated run of median fit time among ``runs`` (repetitions of one configuration), with every run's
    fit time and the fastest run's rates beside it (for R_best)."""
    ordered = sorted(runs, key=lambda run: run["fit_s"])
    fastest = ordered[0]
    return {**ordered[(len(ordered) - 1) // 2], "fit_s_all": [run["fit_s"] for run in runs],
            "best_samples_per_s": fastest["samples_per_s"],
            "best_last_round_samples_per_s": max(run["last_round_samples_per_s"] for run in runs)}


def output_name(args) -> str:
    """The results file's name (without suffix) in docs/benchmarks."""
    return args.output or ("sim_throughput_gpu" if args.gpu else "sim_throughput") + ("_ftz" if args.flush_denormal else "")


def row_key(row: dict) -> tuple:
    """What identifies a measured configuration (a newer measurement of it replaces the older one)."""
    return (row["workload"], int(row.get("samples_per_client", 60)), row["protocol"], row["clients_per_round"], row["backend"],
            int(row.get("client_workers", 1)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocols", nargs="+", default=list(CPU_PROTOCOLS), choices=CPU_PROTOCOLS)
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples-per-client", type=int, nargs="+", default=[60, 600],
                        help="images per client, one workload each (600: Fashion-MNIST's 60,000 over 100 clients)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--ae-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--min-central-samples", type=int, default=6000, help="the centralized side trains at least this many samples")
    parser.add_argument("--repeats", type=int, default=3, help="timed centralized fits before and as many after (the median is used)")
    parser.add_argument("--fed-repeats", type=int, default=1, help="runs of each federated configuration (the median is used)")
    parser.add_argument("--gpu", action="store_true", help="only pfl-research's CIFAR-10 IID workload on CUDA (fedavg, 1,000 clients x 50, "
                        "50 per round); writes sim_throughput_gpu.{json,md}")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="--gpu: where the workload runs (cpu: a check of the "
                        "script where no GPU is lent; its file is not a GPU result)")
    parser.add_argument("--population", type=int, default=1000, help="--gpu: clients in all (pfl-research: 1,000)")
    parser.add_argument("--gpu-clients-per-round", type=int, default=50, help="--gpu: clients per round (pfl-research: 50)")
    parser.add_argument("--num-gpus", type=float, default=0.1, help="Ray client_resources.num_gpus (pfl-research configured Flower with 0.1)")
    parser.add_argument("--client-workers", type=int, default=1, help="in-process: sim.client_workers, each worker with "
                        "--threads / workers torch threads (the centralized side keeps --threads)")
    parser.add_argument("--lr", type=float, default=None, help="train.lr for every run (default: the config's, 0.05)")
    parser.add_argument("--flush-denormal", action="store_true", help="flush_denormal=true on both sides: the runs' config key, and "
                        "torch.set_flush_denormal for the centralized fits (other numerics than the default; writes *_ftz.{json,md})")
    parser.add_argument("--output", default=None, help="results file name in docs/benchmarks (default: sim_throughput, --gpu: sim_throughput_gpu)")
    parser.add_argument("--merge", action="store_true", help="keep the existing file's other rows; replace only those measured again")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md (and derived JSON fields) from the existing JSON")
    args = parser.parse_args()
    if args.render:
        return render_existing(args, output_name(args))
    if args.gpu:  # pfl-research's workload: 50 images per client, local batch 10; one CPU thread per client (Ray: num_cpus=1)
        args.samples_per_client, args.batch_size, args.threads = [50], 10, 1
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    deterministic_kernels()  # as every seeded run asks: the same kernels on both sides
    keep_freed_memory()  # as every graftfl run sets it (graftfl.core.allocator): the same allocator on both sides
    flush_denormals(args.flush_denormal)  # the centralized fits; each federated run sets it from its config
    load_before = os.getloadavg()
    command = "python benchmarks/sim_throughput.py " + " ".join(sys.argv[1:])
    results, failures, gpu = [], [], {"run": False, "reason": "no --gpu flag"}
    workloads = [("cpu", args.protocols, args.clients, per_client) for per_client in args.samples_per_client]
    if args.gpu:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--gpu: CUDA is not available on this machine (--device cpu runs the same workload on the CPU)")
        workloads = [("gpu", ["fedavg"], [args.gpu_clients_per_round], args.samples_per_client[0])]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for workload, protocols, client_counts, per_client in workloads:
            run_args = argparse.Namespace(**{**vars(args), "samples_per_client": per_client}, workload=workload)
            if workload == "gpu":
                write_synthetic_cifar(workdir, args.population, per_client)
            centrals: dict[tuple, dict] = {}  # fedavg, split and dssgd share one centralized model (the unsplit one)
            fitters: dict[tuple, tuple] = {}  # key -> (samples per fit, timed fit)
            pending = []  # (central key, federated result): rows are made once the centralized side is measured again
            for protocol in protocols:
                for clients in client_counts:
                    key = ("autoencoder" if protocol == "features" else "classifier", clients)
                    if key not in centrals:
                        fitters[key] = central_fitter(protocol, clients, run_args, workdir)
                        centrals[key] = {**centralized_rate(*fitters[key], args.repeats), "protocol": protocol}
                    for backend in args.backends:
                        run_once = functools.partial(federated_run, protocol, clients, backend, run_args, workdir)
                        try:
                            fed = paired_runs(run_once, *fitters[key], args.fed_repeats)
                        except Exception as err:  # one failed configuration is reported, the others still run
                            logging.exception("%s N=%s %s failed", protocol, clients, backend)
                            failures.append({"workload": workload, "samples_per_client": per_client, "protocol": protocol, "clients_per_round": clients, "backend": backend,
                                             "error": f"{type(err).__name__}: {err}"[:2000]})
                            continue
                        pending.append((key, {"workload": workload, "samples_per_client": per_client, **fed}))
                        print(json.dumps({k: fed[k] for k in ("protocol", "clients_per_round", "backend", "samples_per_s", "fit_s")}), flush=True)
            for key, central in centrals.items():  # again after the federated runs: a machine that slowed meanwhile biases neither side
                centrals[key] = pooled(central, centralized_rate(*fitters[key], args.repeats))
            for key, fed in pending:
                central = centrals[key]
                results.append(with_best_central({**fed, "central_samples_per_s": central["samples_per_s"], "central": central,
                                                  "R": fed["samples_per_s"] / central["samples_per_s"],
                                                  "R_last_round": fed["last_round_samples_per_s"] / central["samples_per_s"]}))
                print(json.dumps({k: results[-1][k] for k in ("workload", "samples_per_client", "protocol", "clients_per_round", "backend", "R", "R_last_round")}), flush=True)
            if workload == "gpu":
                gpu = {"run": True, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (not a GPU result)"}
    if not args.gpu:
        gpu = {"run": False, "reason": "not run: no GPU on the machine that produced this file; run with --gpu where CUDA is available",
               "workload": "pfl-research CIFAR-10 IID: synthetic 3x32x32, 1,000 clients x 50 images, 50 per round, batch 10, "
                           "1 local epoch, model=cnn, Ray client_resources.num_gpus=0.1"}
    payload = {"commands": [command], "torch_threads": args.threads, "flush_denormal": args.flush_denormal, "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]], "torch": torch.__version__, "results": results, "failures": failures, "gpu": gpu,
               "goals": {"fedavg_N100_cpu": 0.9, "others_cpu": 0.8, "gpu_N100": 0.8}}
    if args.merge:
        payload = merge_with_existing(output_name(args), payload, row_key)
    args.samples_per_client = sorted({int(row.get("samples_per_client", 60)) for row in payload["results"] + payload["failures"]})
    write_results(output_name(args), payload, report(payload, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
