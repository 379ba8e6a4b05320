"""`graftfl sim protocol=dssgd|centralized|standalone` write the same run format; the ko_table4 sweep has every arm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from graftfl.cli import main as graftfl_main
from graftfl.config import compose_config, expand_sweep

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "accuracy.png", "accuracy_vs_bytes.png")
ROW_FIELDS = ("round", "accuracy", "loss", "bytes_up", "bytes_down", "client_flops", "wall_s")


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_run_format(run_dir: Path, protocol: str, rounds: int) -> list[dict]:
    for name in RUN_FILES:
        assert (run_dir / name).exists(), f"{name} missing from {run_dir}"
    rows = rows_of(run_dir)
    assert [row["round"] for row in rows] == list(range(1, rounds + 1))
    for row in rows:
        assert all(field in row for field in ROW_FIELDS), row.keys()
        assert 0.0 <= row["accuracy"] <= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["protocol"] == protocol and summary["rounds"] == rounds and summary["accuracy"] == rows[-1]["accuracy"]
    return rows


@pytest.mark.slow
def test_sim_dssgd_writes_the_run_directory(tmp_path):
    """The real command, Flower simulation (Ray) included."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    args = [sys.executable, "-m", "graftfl.cli", "sim", "protocol=dssgd", "dataset=digits", "num_clients=3", "rounds=2", "progress=false"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run: "), last
    run_dir = tmp_path / last.removeprefix("run: ")
    rows = assert_run_format(run_dir, "dssgd", 2)
    for row in rows:
        assert row["clients"] == [0, 1, 2] and not row["rejected"] and not row["failed"]
        assert row["local_accuracy_min"] <= row["local_accuracy_mean"] <= row["local_accuracy_max"]
        assert row["accuracy"] == pytest.approx(row["local_accuracy_mean"])
        assert 0.0 <= row["global_accuracy"] <= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    payload = summary["upload_budget"] * 8  # int32 index + float32 value per coordinate
    # the whole serialized reply: the sparse payload plus its metrics and metadata (a few hundred bytes)
    assert all(payload < upload < payload + 4096 for upload in rows[0]["client_bytes_up"]), rows[0]["client_bytes_up"]


@pytest.mark.parametrize("protocol", ["centralized", "standalone"])
def test_baselines_write_the_same_run_format(tmp_path, capsys, protocol):
    code = graftfl_main(["sim", f"protocol={protocol}", "dataset=digits", "num_clients=3", "rounds=2", "progress=false", f"output_dir={tmp_path}", "train.local_steps=5"])
    assert code == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("run: "))
    rows = assert_run_format(run_dir, protocol, 2)
    assert all(row["bytes_up"] == 0 and row["bytes_down"] == 0 for row in rows)
    if protocol == "standalone":
        assert all(len(row["client_local_accuracy"]) == 3 for row in rows)
        assert all(row["local_accuracy_min"] <= row["accuracy"] <= row["local_accuracy_max"] for row in rows)
    else:
        assert rows[0]["samples"] == 1797 - 360  # the union of the 3 partitions: every digits training image


def test_ko_table4_sweep_expands_to_every_arm():
    jobs = expand_sweep(["experiment=ko_table4"])
    arms = []
    for job in jobs:
        cfg = compose_config(job)
        assert cfg.dataset.name == "fashion_mnist" and cfg.num_clients == 10 and cfg.partition.samples_per_client == 1000
        arms.append((cfg.protocol.name, cfg.protocol.get("theta_upload"), cfg.privacy.name))
        if cfg.protocol.name == "dssgd":
            assert cfg.protocol.theta_download == 1.0
    assert arms == [
        ("centralized", None, "none"),
        ("dssgd", 0.1, "none"),
        ("dssgd", 0.01, "none"),
        ("dssgd", 0.001, "none"),
        ("standalone", None, "none"),
        ("dssgd", 0.1, "dpsgd"),
    ]
    svhn = compose_config(expand_sweep(["experiment=ko_table4", "dataset=svhn", "model=cnn"])[1])
    assert svhn.dataset.name == "svhn" and svhn.model.name == "cnn"


def _fake_run(folder: Path, name: str, protocol: str, accuracy: float, theta: float | None = None, dp: bool = False, upload: int = 0) -> None:
    """A finished run directory with the fields the collector reads."""
    import yaml

    run_dir = folder / name
    run_dir.mkdir(parents=True)
    config = {
        "protocol": {"name": protocol, **({"theta_upload": theta} if theta else {})},
        "privacy": {"name": "dpsgd" if dp else "none", "target_epsilon": 3.0 if dp else None},
        "dataset": {"name": "fashion_mnist", "test_size": 2000},
        "model": {"name": "lenet"},
        "partition": {"samples_per_client": 1000},
        "num_clients": 10,
        "rounds": 1,
        "train": {"batch_size": 32, "lr": 0.01},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    row = {"round": 1, "accuracy": accuracy, "client_bytes_up": [upload] * 10 if upload else []}
    if protocol != "centralized":
        row.update(local_accuracy_min=accuracy - 0.01, local_accuracy_max=accuracy + 0.01)
    (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    summary = {"accuracy": accuracy, "wall_s": 1.0, **({"num_params": 100_000} if protocol == "dssgd" else {}), **({"epsilon": 2.9} if dp else {})}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_ko_table4_collector_writes_table_targets_and_plot(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ko_table4", ROOT / "benchmarks" / "ko_table4.py")
    collector = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collector)
    runs = tmp_path / "runs"
    _fake_run(runs, "1-centralized", "centralized", 0.88)
    _fake_run(runs, "2-dssgd", "dssgd", 0.87, theta=0.1, upload=80_000)
    _fake_run(runs, "3-dssgd", "dssgd", 0.80, theta=0.01, upload=8_000)
    _fake_run(runs, "4-dssgd", "dssgd", 0.70, theta=0.001, upload=800)
    _fake_run(runs, "5-standalone", "standalone", 0.78)
    _fake_run(runs, "6-dssgd", "dssgd", 0.80, theta=0.1, dp=True, upload=80_000)
    assert collector.main(["--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "ko_table4.json").read_text())
    assert [row["label"] for row in result["rows"]][:2] == ["centralized SGD", "DSSGD θu = 0.1"]
    met = {check["target"]: check["met"] for check in result["targets"]}
    assert met["θu=0.1 within 2 pp of centralized"] is True  # 1 pp
    assert met["θu=0.01 within 5 pp of centralized"] is False  # 8 pp: a miss is reported, not hidden
    assert met["standalone ≥ 3 pp below θu=0.1"] is True
    assert met["upload at θu=0.01 ≤ 3% of dense FedAvg upload"] is True  # 8,000 of 400,000 B
    assert "**no**" in (tmp_path / "out" / "ko_table4.md").read_text()
    assert (tmp_path / "out" / "ko_table4.png").stat().st_size > 0
