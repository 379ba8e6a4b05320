"""dataset=site in Flower's simulation runtime and in a real local deployment (``--data-dir sites/``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from graftfl.cli import main as graftfl_main
from graftfl.core.sitedata import SiteDeclaration, load_site_data
from graftfl.strategies.features.store import FeatureStore
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow  # simulations and deployments
SITE = ["dataset=site", "dataset.input_shape=[1,8,8]", "dataset.num_classes=10", "progress=false"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "sites"
    assert graftfl_main(["prepare-sites", "dataset=digits", "num_clients=3", f"out={out}"]) == 0
    return out


def assert_site_run(run_dir: Path, sites: Path, protocol: str, min_accuracy: float) -> list[dict]:
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
    rows = assert_site_run(run_dir, sites, protocol, 0.5)
    assert len(rows[-1]["eval_client_accuracy"]) == 3
    # The run directory of a simulation (for split, the only split run in Flower's simulation runtime).
    from tests.test_deploy_local import assert_run_directory

    rounds = int(next(arg for arg in extra if arg.startswith("rounds=")).removeprefix("rounds="))
    assert_run_directory(run_dir, num_clients=3, rounds=rounds, protocol=protocol, dataset="site")
    assert rows[-1]["accuracy"] > 0.5 and len(rows[-1]["clients"]) == 3
    if protocol == "split":
        assert json.loads((run_dir / "summary.json").read_text())["failed_turns"] == []


def _assert_features_deployment(run_dir: Path, rows: list[dict], sites: Path) -> None:
    """Feature upload on a real deployment: autoencoders, chunked uploads into the store, service mode."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["protocol"] == "features" and summary["rejected_chunks"] == 0
    assert summary["accuracy"] > 0.5  # chance is 0.1
    for name in ("features.db", "classifier.pt", "tables.json", "table_accuracy.md"):
        assert (run_dir / name).exists(), name
    uploads = [row for row in rows if row["phase"] == "upload"]
    assert len(uploads) >= 2  # chunked: every site needs more than one upload message
    # every training row of every site reaches the store once
    declaration = SiteDeclaration.from_config(OmegaConf.load(run_dir / "config.yaml").dataset)
    training_rows = sum(int((~load_site_data(sites / f"site-{i}", declaration, f"site-{i}", site_fraction=0.1, use_cache=False).test_mask).sum())
                        for i in range(3))
    assert sum(row.get("new_records", 0) for row in uploads) == training_rows
    with FeatureStore(run_dir / "features.db") as store:
        assert store.count() == training_rows
    # The paper's mode (the default): one autoencoder per site, one offline classifier training.
    autoencoder_rows = [row for row in rows if row["phase"] == "autoencoder"]
    assert len(autoencoder_rows) == 1 and autoencoder_rows[0]["ae_training"] == "local" and summary["ae_training"] == "local"
    assert [row["classifier_mode"] for row in rows if row["phase"] == "classifier"] == ["offline"]
    autoencoders = [torch.load(run_dir / "sites" / f"site-{i}" / "autoencoder.pt", weights_only=True)["state"] for i in range(3)]
    for other in autoencoders[1:]:  # each site its own autoencoder (a public one would be the same everywhere)
        assert not all(torch.equal(autoencoders[0][k], other[k]) for k in autoencoders[0])


# One deployment per protocol, each proving several things: it costs a minute of a 2-core CI machine.
# fedavg on site folders (insecure): tests/test_dedup_phase.py::test_sim_and_deploy_local_give_the_same_dedup_and_then_train;
# --auth with a registry dataset: tests/test_deploy_local.py::test_deploy_local_ushaped_over_a_tls_data_plane.
@pytest.mark.parametrize("protocol,flags,extra", [
    ("split", ["--tls"], ["protocol.handoff=relay", "rounds=1", "protocol.turn_batches=8"]),
    ("dssgd", [], ["rounds=1", "protocol.theta_upload=1.0", "protocol.theta_download=1.0", "protocol.selection=largest"]),
    ("features", [], ["protocol.autoencoder.epochs=1", "protocol.latent_dim=16", "protocol.chunk_size=250"]),
], ids=["split-tls", "dssgd", "features"])
def test_deploy_local_with_three_site_folders(tmp_path, sites, monkeypatch, protocol, flags, extra):
    """``--data-dir``: SuperNode i gets node-config data-path=sites/site-<i>; the ServerApp's composed config
    (written to the run's config.yaml) names no data location."""
    from tests.test_deploy_local import assert_deployment, assert_run_directory, run_deploy_local  # the shared runner: asserts that no process survives

    monkeypatch.delenv("GRAFTFL_SPLIT_KEY", raising=False)  # relay hand-off: deploy-local makes a key only the SuperNodes hold
    started = time.monotonic()
    run_dir, stderr = run_deploy_local([*flags, "--data-dir", str(sites), *SITE, f"protocol={protocol}", "num_clients=3", *extra], tmp_path)
    print(f"deploy-local {protocol} on site folders: {time.monotonic() - started:.1f} s")
    rows = assert_site_run(run_dir, sites, protocol, 0.2)
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert_deployment(stderr, config, num_nodes=3, tls="--tls" in flags)
    if protocol == "features":
        _assert_features_deployment(run_dir, rows, sites)
        return
    assert_run_directory(run_dir, num_clients=3, rounds=1, protocol=protocol, dataset="site")
    if protocol == "split":
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["failed_turns"] == [] and summary["handoff"] == "relay" and summary["data_plane_tls"] is True
