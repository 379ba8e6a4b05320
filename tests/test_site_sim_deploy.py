"""dataset=site in Flower's simulation runtime and in a real local deployment (``--data-dir sites/``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from graftfl.cli import main as graftfl_main
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow  # simulations and deployments
SITE = ["dataset=site", "dataset.input_shape=[1,8,8]", "dataset.num_classes=10", "progress=false"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "sites"
    assert graftfl_main(["prepare-sites", "dataset=digits", "num_clients=3", f"out={out}"]) == 0
    return out


def _assert_site_run(run_dir: Path, sites: Path, protocol: str, min_accuracy: float) -> list[dict]:
    config = (run_dir / "config.yaml").read_text()
    assert "data-path" not in config and str(sites) not in config and "sites" not in OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))["dataset"]
    rows = read_metrics(run_dir)
    if protocol == "features":
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["phases"]["normalize"]["sites"] == 3
        return rows
    last = rows[-1]
    assert last["eval_where"] == "site" and sorted(last["eval_clients"]) == [0, 1, 2] and all(c > 0 for c in last["eval_client_count"])
    accuracy = last["global_accuracy"] if protocol == "dssgd" else last["accuracy"]
    assert accuracy >= min_accuracy, f"{protocol}: {accuracy}"
    return rows


@pytest.mark.parametrize("protocol,extra", [
    ("fedavg", ["rounds=3"]),
    ("split", ["protocol.handoff=relay", "rounds=2", "protocol.turn_batches=12"]),
])
def test_sim_on_prepared_site_folders_trains_and_the_server_process_opens_no_site_file(tmp_path, sites, monkeypatch, protocol, extra):
    """The ServerApp runs in this process, the virtual sites in Ray workers: any open under sites/ here is the server's."""
    from graftfl.cli import simulate
    from graftfl.config import compose_config

    opened = []
    root = str(sites.resolve())

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], str) and args[0].startswith(root) and recording:
            opened.append(args[0])

    recording = True
    sys.addaudithook(hook)
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    try:
        run_dir = simulate(compose_config([*SITE, f"protocol={protocol}", "num_clients=3", f"output_dir={tmp_path}/runs", *extra]), data_dir=sites)
    finally:
        recording = False
    print(f"sim {protocol} on site folders: {time.monotonic() - started:.1f} s")
    assert opened == []
    rows = _assert_site_run(run_dir, sites, protocol, 0.5)
    assert len(rows[-1]["eval_client_accuracy"]) == 3


@pytest.mark.parametrize("protocol,extra", [
    ("fedavg", ["rounds=1"]),
    ("split", ["protocol.handoff=relay", "rounds=1", "protocol.turn_batches=8"]),
    ("dssgd", ["rounds=1", "protocol.theta_upload=1.0", "protocol.theta_download=1.0", "protocol.selection=largest"]),
    ("features", ["protocol.autoencoder.epochs=1"]),
])
def test_deploy_local_with_three_site_folders(tmp_path, sites, protocol, extra):
    """``--data-dir``: SuperNode i gets node-config data-path=sites/site-<i>; the ServerApp's composed config
    (written to the run's config.yaml) names no data location."""
    from tests.test_deploy_local import run_deploy_local  # the shared runner: asserts that no process survives

    started = time.monotonic()
    run_dir, _ = run_deploy_local(["--data-dir", str(sites), *SITE, f"protocol={protocol}", "num_clients=3", *extra], tmp_path)
    print(f"deploy-local {protocol} on site folders: {time.monotonic() - started:.1f} s")
    _assert_site_run(run_dir, sites, protocol, 0.2)
