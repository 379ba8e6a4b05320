"""FedAvg end to end in Flower's simulation runtime (Ray), through the real `graftfl sim` command."""

import json

import pytest
import torch

from tests.conftest import read_metrics, run_dir_from, run_graftfl

pytestmark = pytest.mark.slow  # every test here starts a Flower simulation

BASE = ["protocol=fedavg", "dataset=digits", "num_clients=3", "progress=false"]


def test_fedavg_simulation_writes_the_run_directory(workdir):
    proc = run_graftfl("sim", *BASE, "rounds=2", "seed=7", cwd=workdir)
    run_dir = run_dir_from(proc, workdir)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "accuracy.png", "accuracy_vs_bytes.png"):
        assert (run_dir / name).exists(), name
    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert {"accuracy", "loss", "bytes_up", "bytes_down", "client_flops", "wall_s"} <= row.keys()
        assert row["clients"] == [0, 1, 2] and len(row["client_bytes_up"]) == 3
        assert row["bytes_up"] > 0 and row["client_flops"] > 0
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]  # momentum SGD on digits learns within two rounds
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["protocol"] == "fedavg" and summary["num_clients"] == 3 and summary["rounds"] == 2
    assert summary["bytes_up"] == sum(row["bytes_up"] for row in rows)
    assert "seed: 7" in (run_dir / "config.yaml").read_text()

    # Determinism and resume: the same seeded run on CPU, interrupted after round 1 and resumed in
    # fresh processes, ends with the weights of the uninterrupted run. Three sites: the average of three
    # updates depends on the order they are summed in, which on Ray follows which site finished first.
    interrupted = run_dir_from(run_graftfl("sim", *BASE, "rounds=1", "seed=7", cwd=workdir), workdir)
    resumed = run_dir_from(run_graftfl("sim", f"resume={interrupted.relative_to(workdir)}", "rounds=2", cwd=workdir), workdir)
    assert resumed == interrupted
    assert [row["round"] for row in read_metrics(resumed)] == [1, 2]
    assert torch.load(resumed / "checkpoint.pt")["round"] == 2
    assert json.loads((resumed / "summary.json").read_text())["rounds"] == 2
    first, second = torch.load(run_dir / "checkpoint.pt")["model"], torch.load(resumed / "checkpoint.pt")["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_fedavg_with_dpsgd_reports_a_cumulative_epsilon_also_across_resume(workdir):
    proc = run_graftfl("sim", *BASE, "rounds=2", "privacy=dpsgd", "privacy.noise_multiplier=1.0", cwd=workdir)
    run_dir = run_dir_from(proc, workdir)
    rows = read_metrics(run_dir)
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"]
    assert len(rows[1]["client_epsilon"]) == 3
    # A resumed run starts fresh client processes; the checkpointed accountant keeps epsilon cumulative.
    run_graftfl("sim", f"resume={run_dir.relative_to(workdir)}", "rounds=3", cwd=workdir)
    rows = read_metrics(run_dir)
    assert rows[2]["epsilon"] > rows[1]["epsilon"]
    gain_2 = rows[1]["epsilon"] - rows[0]["epsilon"]
    assert rows[2]["epsilon"] - rows[1]["epsilon"] < gain_2  # concave growth: history continued, not restarted
