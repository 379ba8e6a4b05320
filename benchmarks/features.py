"""Benchmarks of protocol=features (Salehinejad et al.), written to docs/benchmarks/features.{json,md}.

1. Classification accuracy from latents, per ``autoencoder.training`` mode, with the real
   ``graftfl sim experiment=features_paper`` (5 sites x 1,000 images, 1,000 test
   images), beside the same MLP trained centrally on the raw pixels of the same
   5,000 images.
2. Upload throughput into the SQLite feature store (records/s), for the store alone
   (chunks of 250 x 784 float32, synchronous FULL and NORMAL) and end to end in the
   simulation (records / wall time of the upload phase, Flower messages included).
3. Prediction-service latency (p50/p99) and requests/s: ``graftfl serve`` in its own
   process on loopback, a bounded load of concurrent HTTP clients.

Run under the shared lock:  flock /tmp/graftfl-bench.lock python benchmarks/features.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graftfl.core.autoencoder import train_classifier  # noqa: E402
from graftfl.core.data import DatasetUnavailable, load_dataset  # noqa: E402
from graftfl.core.partition import partition_indices  # noqa: E402
from graftfl.core.train import evaluate  # noqa: E402
from graftfl.strategies.features.store import Chunk, FeatureStore  # noqa: E402

OUT = ROOT / "docs" / "benchmarks"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------- accuracy ---


def run_sim(dataset: str, mode: str, workdir: Path, extra: list[str], setting: str) -> dict:
    args = [sys.executable, "-m", "graftfl.cli", "sim", "experiment=features_paper", f"dataset={dataset}", f"protocol.autoencoder.training={mode}", "progress=false", f"output_dir={workdir}", *extra]
    started = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run: "))
    tables = json.loads((run_dir / "tables.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    upload_rows = [r for r in rows if r["phase"] == "upload"]
    upload_records = sum(r["records"] for r in upload_rows)
    upload_s = sum(r["wall_s"] for r in upload_rows)
    return {
        "setting": setting,
        "dataset": dataset,
        "ae_training": mode,
        "accuracy": tables["accuracy"],
        "per_class_accuracy": tables["per_class_accuracy"],
        "reconstruction_error": tables["reconstruction_error"],
        "per_class_reconstruction_error": tables["per_class_reconstruction_error"],
        "command_wall_s": wall,
        "upload_records": upload_records,
        "upload_messages": len(upload_rows) * 5,
        "upload_wall_s": upload_s,
        "upload_records_per_s_end_to_end": upload_records / upload_s if upload_s else None,
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "run_dir": str(run_dir),
    }


def raw_pixel_baseline(dataset: str, clients: int, per_client: int, test_size: int, epochs: int, seed: int = 0) -> dict:
    """The paper's MLP on raw pixels of the same images, trained centrally."""
    data = load_dataset(dataset, "data", False)
    partition = OmegaConf.create({"name": "iid", "samples_per_client": per_client})
    train_rows = np.concatenate([partition_indices(data.train_y, partition, clients, k, seed) for k in range(clients)])
    test_rows = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(seed))[:test_size]
    started = time.monotonic()
    model, fit = train_classifier(data.train_x[train_rows].flatten(1), data.train_y[train_rows], data.num_classes, epochs=epochs, seed=seed)
    result = evaluate(model, data.test_x[test_rows].flatten(1), data.test_y[test_rows], device=torch.device("cpu"), num_classes=data.num_classes)
    return {"setting": f"{clients} x {per_client}", "dataset": dataset, "model": "MLP 256-128-64 on raw pixels (central)", "train_images": len(train_rows), "accuracy": result["accuracy"], "per_class_accuracy": result["per_class_accuracy"], "train_s": time.monotonic() - started}


def dataset_present(name: str) -> bool:
    try:
        load_dataset(name, "data", False, "organamnist" if name == "medmnist" else None)
        return True
    except (DatasetUnavailable, ValueError, FileNotFoundError):
        return False


# ------------------------------------------------------------ store ingest ---


def store_throughput(records: int, dim: int, chunk_size: int, synchronous: str) -> dict:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(records, dim)).astype(np.float32)  # throughput does not depend on the values
    labels = rng.integers(0, 10, size=records)
    chunks = [Chunk(f"site-{i % 5}", f"chunk-{i:05d}", 0, labels[s : s + chunk_size], vectors[s : s + chunk_size]) for i, s in enumerate(range(0, records, chunk_size))]
    with tempfile.TemporaryDirectory() as folder:
        with FeatureStore(Path(folder) / "features.db", synchronous) as store:
            started = time.monotonic()
            for chunk in chunks:
                store.ingest_chunk(chunk)
            elapsed = time.monotonic() - started
            resent_started = time.monotonic()
            for chunk in chunks[:20]:
                store.ingest_chunk(chunk)  # idempotent re-sends
            resent = time.monotonic() - resent_started
            assert store.count() == records
    return {
        "synchronous": synchronous,
        "records": records,
        "dim": dim,
        "chunk_size": chunk_size,
        "seconds": elapsed,
        "records_per_s": records / elapsed,
        "chunks_per_s": len(chunks) / elapsed,
        "resend_records_per_s": 20 * chunk_size / resent,
    }


# ------------------------------------------------------------ service load ---


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_load(run_dir: Path, clients: int, requests_per_client: int) -> dict:
    """``graftfl serve`` in a subprocess; ``clients`` threads each send requests back to back."""
    with FeatureStore(run_dir / "features.db") as store:
        vectors, _ = store.load()
    port = free_port()
    # per-site bearer tokens, kept outside the run directory (graftfl serve stores only their hashes there)
    tokens = {f"site-{number}": secrets.token_urlsafe(32) for number in range(5)}
    tokens_dir = tempfile.mkdtemp(prefix="graftfl-bench-tokens-")
    tokens_file = Path(tokens_dir) / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    tokens_file.chmod(0o600)
    server = subprocess.Popen([sys.executable, "-m", "graftfl.cli", "serve", "--run", str(run_dir), "--port", str(port), "--tokens", str(tokens_file)],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2, headers={"Authorization": f"Bearer {tokens['site-0']}"}).json()["ready"]:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("graftfl serve did not come up")
        latencies: list[float] = []
        errors = []
        lock = threading.Lock()

        def client(number: int) -> None:
            rng = np.random.default_rng(number)
            mine = []
            with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {tokens[f'site-{number % 5}']}"}) as session:
                for _ in range(requests_per_client):
                    vector = vectors[rng.integers(len(vectors))].tolist()
                    body = {"message": {"clientID": f"site-{number % 5}", "value": vector, "mode": "service", "timestamp": "t"}}
                    started = time.perf_counter()
                    answer = session.post("/predict", json=body)
                    mine.append(time.perf_counter() - started)
                    if answer.status_code != 200:
                        errors.append(answer.status_code)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        tokens_file.unlink()
        os.rmdir(tokens_dir)
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "latent_dim": int(vectors.shape[1]),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "requests_per_s": len(latencies) / elapsed,
    }


# ------------------------------------------------------------------ report ---


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def write_report(result: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "features.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# protocol=features benchmarks",
        "",
        f"Measured {result['measured_at']} on {result['machine']} (a 2-core machine shared with other work; timings are indicative).",
        f"Command: `{result['command']}`",
        "",
        "## Classification accuracy from latents (target: Fashion-MNIST >= 87%)",
        "",
        "Setting: `experiment=features_paper` (5 sites x 1,000 training images, 1,000 test images, conv_ae latent 784, "
        "MLP 256-128-64 with Adam, batch 64). Accuracy is the service-mode total of Table II; δ is Eq. 9 on the sites' test images.",
        "",
        "| setting | dataset | ae_training | accuracy | target met | reconstruction error δ | sim wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["accuracy"]:
        target = 0.87 if row["dataset"] == "fashion_mnist" else 0.985 if row["dataset"] == "mnist" else None
        met = "n/a" if target is None else ("yes" if row["accuracy"] >= target else "**no**")
        lines.append(f"| {row['setting']} | {row['dataset']} | {row['ae_training']} | {pct(row['accuracy'])} | {met} | {row['reconstruction_error']:.4f} | {row['command_wall_s']:.0f} |")
    for row in result["raw_pixel_baseline"]:
        lines.append(f"| {row['setting']} | {row['dataset']} | raw pixels, central MLP ({row['train_images']} images) | {pct(row['accuracy'])} | | | |")
    if result["datasets_missing"]:
        lines += ["", f"Not measured (files not present on this machine): {', '.join(result['datasets_missing'])}."]
    lines += [
        "",
        "## Upload throughput into the feature store",
        "",
        "| path | synchronous | records | records/s | chunks/s | re-send records/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["store_throughput"] or []:
        lines.append(f"| store alone (chunks of {row['chunk_size']} x {row['dim']} float32) | {row['synchronous']} | {row['records']} | {row['records_per_s']:.0f} | {row['chunks_per_s']:.1f} | {row['resend_records_per_s']:.0f} |")
    for row in result["accuracy"]:
        if row["upload_records_per_s_end_to_end"]:
            lines.append(f"| simulation end to end ({row['dataset']}, {row['ae_training']}; Flower messages, encoding, commit) | FULL | {row['upload_records']} | {row['upload_records_per_s_end_to_end']:.0f} | | |")
    service = result["service"]
    if service is None:
        (OUT / "features.md").write_text("\n".join(lines) + "\n")
        return
    lines += [
        "",
        "## Prediction service (`graftfl serve`, loopback)",
        "",
        f"{service['clients']} concurrent HTTP clients, {service['requests']} requests in all, latent length {service['latent_dim']}, server in its own process.",
        "",
        "| p50 ms | p99 ms | mean ms | requests/s | errors |",
        "|---|---|---|---|---|",
        f"| {service['p50_ms']:.1f} | {service['p99_ms']:.1f} | {service['mean_ms']:.1f} | {service['requests_per_s']:.0f} | {service['errors']} |",
    ]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    (OUT / "features.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["fashion_mnist", "mnist", "medmnist"])
    parser.add_argument("--modes", nargs="+", default=["local", "federated", "public"])
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--requests", type=int, default=250, help="requests per HTTP client")
    parser.add_argument("--store-records", type=int, default=20000)
    parser.add_argument("--sim-args", nargs="*", default=[], help="extra overrides for every simulation")
    parser.add_argument("--samples-per-client", type=int, default=1000)
    parser.add_argument("--accuracy-only", action="store_true", help="add accuracy rows to the existing features.json (no store/service runs)")
    args = parser.parse_args()
    setting = f"5 x {args.samples_per_client}" + (f" ({' '.join(args.sim_args)})" if args.sim_args else "")
    args.sim_args = [f"partition.samples_per_client={args.samples_per_client}", *args.sim_args]
    torch.set_num_threads(2)

    present = [d for d in args.datasets if dataset_present(d)]
    missing = [d for d in args.datasets if d not in present]
    if args.accuracy_only:
        result = json.loads((OUT / "features.json").read_text())
        result["command"] += f"; python benchmarks/features.py {' '.join(sys.argv[1:])}"
    else:
        result = {
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "command": "flock /tmp/graftfl-bench.lock python benchmarks/features.py " + " ".join(sys.argv[1:]),
            "accuracy": [],
            "raw_pixel_baseline": [],
            "datasets_missing": missing,
            "store_throughput": None,
            "service": None,
        }
    # The report is rewritten after every measurement, so a cut-short run still leaves its figures.
    with tempfile.TemporaryDirectory() as workdir:
        for dataset in present:
            extra = ["dataset.subset=organamnist"] if dataset == "medmnist" else []
            for mode in args.modes:
                row = run_sim(dataset, mode, Path(workdir), extra + args.sim_args, setting)
                print(f"[bench] {dataset} {mode}: accuracy {row['accuracy']:.4f} ({row['command_wall_s']:.0f} s)", flush=True)
                run_dir = Path(row.pop("run_dir"))
                result["accuracy"].append(row)
                write_report(result)
                if result["service"] is None:
                    result["store_throughput"] = [store_throughput(args.store_records, 784, 250, mode) for mode in ("FULL", "NORMAL")]
                    print(f"[bench] store: {[round(r['records_per_s']) for r in result['store_throughput']]} records/s", flush=True)
                    result["service"] = service_load(run_dir, args.clients, args.requests)
                    service = result["service"]
                    print(f"[bench] service: p50 {service['p50_ms']:.1f} ms p99 {service['p99_ms']:.1f} ms {service['requests_per_s']:.0f} req/s", flush=True)
                    write_report(result)
            result["raw_pixel_baseline"].append(raw_pixel_baseline(dataset, 5, args.samples_per_client, 1000, epochs=30))
            print(f"[bench] {dataset} raw pixels: {result['raw_pixel_baseline'][-1]['accuracy']:.4f}", flush=True)
            write_report(result)
    print(f"wrote {OUT / 'features.md'}", flush=True)


if __name__ == "__main__":
    main()
