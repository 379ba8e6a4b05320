"""`graftfl sim protocol=features` end to end, then `graftfl serve` and `graftfl predict` on its run."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from graftfl.core.autoencoder import encode, load_autoencoder, load_classifier
from graftfl.cli import main
from graftfl.core.data import channel_stats, load_dataset
from graftfl.commands.feature_service import BackgroundServer, app_for_run
from graftfl.strategies.features.store import FeatureStore
from graftfl.service_auth import TokenTable
from tests.conftest import read_metrics, run_dir_from, run_graftfl

SIM_ARGS = [
    "protocol=features",
    "dataset=digits",
    "num_clients=2",
    "partition.samples_per_client=300",
    "dataset.test_size=200",
    "protocol.latent_dim=16",
    "protocol.autoencoder.training=federated",
    "protocol.autoencoder.rounds=2",
    "protocol.autoencoder.local_epochs=3",
    "protocol.chunk_size=100",
    "protocol.classifier.mode=online",
    "protocol.classifier.retrain_every=200",
    "protocol.classifier.epochs=20",
    "progress=false",
]


@pytest.fixture(scope="module")
def features_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("features-sim")
    proc = run_graftfl("sim", *SIM_ARGS, cwd=workdir, timeout=400)
    return run_dir_from(proc, workdir)


@pytest.mark.slow
def test_sim_writes_tables_figures_store_and_metrics(features_run):
    run_dir = features_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "classifier.pt", "features.db", "tables.json", "table_accuracy.md", "table_reconstruction.md"):
        assert (run_dir / name).exists(), name
    for site in ("site-0", "site-1"):
        assert (run_dir / "sites" / site / "autoencoder.pt").exists()
        assert (run_dir / "sites" / site / "reconstructions.png").stat().st_size > 1000

    rows = read_metrics(run_dir)
    phases = [row["phase"] for row in rows]
    assert phases[:2] == ["autoencoder", "autoencoder"] and phases[-1] == "service"
    assert phases.count("upload") == 3  # 300 rows per site in chunks of 100
    retrains = [row for row in rows if row["phase"] == "classifier"]
    assert len(retrains) >= 2 and all(row["classifier_mode"] == "online" for row in retrains)
    assert [row["classifier_version"] for row in retrains] == list(range(1, len(retrains) + 1))
    assert retrains[-1]["records"] == 600

    tables = json.loads((run_dir / "tables.json").read_text())
    assert tables["test_samples"] == 200 and len(tables["per_class_accuracy"]) == 10
    assert tables["accuracy"] > 0.5  # chance is 0.1
    assert all(d > 0 for d in tables["per_class_reconstruction_error"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy"] == tables["accuracy"] and summary["ae_training"] == "federated"
    assert "| **total** | **200** |" in (run_dir / "table_accuracy.md").read_text()
    assert "**overall**" in (run_dir / "table_reconstruction.md").read_text()

    with FeatureStore(run_dir / "features.db") as store:
        vectors, labels = store.load()
        assert vectors.shape == (600, 16) and store.count() == 600
        clients = {client for client, _ in store.upload_sizes()}
    assert len(clients) == 2 and all(client.startswith("node-") for client in clients)  # named by the server, per node
    assert summary["rejected_chunks"] == summary["rejected_service_replies"] == 0 and summary["rejections"] == []
    assert all(row["rejected"] == [] for row in rows if row["phase"] in ("upload", "service"))


@pytest.mark.slow
def test_serve_and_predict_on_the_run(features_run, tmp_path, capsys):
    run_dir = features_run
    digits = load_dataset("digits")
    mean, std = channel_stats(OmegaConf.create({"name": "digits", "root": "data", "download": False}))
    images = []
    for number in range(4):  # the test images back on the 0-255 scale, as a site would have them
        pixels = np.rint((digits.test_x[number, 0].numpy() * std[0] + mean[0]) * 255).clip(0, 255).astype(np.uint8)
        path = tmp_path / f"digit{number}.png"
        Image.fromarray(pixels, mode="L").save(path)
        images.append(path)
    autoencoder, _ = load_autoencoder(run_dir / "sites" / "site-1" / "autoencoder.pt")
    classifier, _ = load_classifier(run_dir / "classifier.pt")
    expected = classifier(encode(autoencoder, digits.test_x[:4])).argmax(dim=1).tolist()

    token = "site-1-" + "t" * 32
    auth = {"Authorization": f"Bearer {token}"}
    with BackgroundServer(app_for_run(run_dir, TokenTable.from_tokens({"site-1": token}))) as server:  # the app `graftfl serve` runs
        assert httpx.get(f"{server.url}/health", headers=auth).json()["latent_dim"] == 16
        assert main(["predict", "--run", str(run_dir), "--client-id", "1", "--url", server.url, "--token", token, *map(str, images)]) == 0
        answered = [int(line.split("\t")[1]) for line in capsys.readouterr().out.strip().splitlines()]
        assert answered == expected
        bad = httpx.post(f"{server.url}/predict", json={"message": {"clientID": "site-1", "value": [0.0] * 15, "mode": "service"}}, headers=auth)
        assert bad.status_code == 422 and "length 16" in bad.json()["detail"]
    assert main(["predict", "--run", str(run_dir), "--client-id", "7", str(images[0])]) == 2
    assert "no encoder" in capsys.readouterr().err


def test_serve_command_without_a_finished_run(tmp_path, capsys):
    assert main(["serve", "--run", str(tmp_path), "--port", "1"]) == 2
    assert "classifier.pt" in capsys.readouterr().err


# ae_training=local (the paper's mode, the default) with the offline classifier runs on a real deployment:
# tests/test_site_sim_deploy.py::test_deploy_local_with_three_site_folders[features] asserts the same there.
@pytest.mark.slow
@pytest.mark.parametrize("ae_training", ["public"])
def test_sim_public_autoencoder_with_the_offline_classifier(tmp_path, ae_training):
    """The public autoencoder (one for all sites) with one offline training (the local one: see above)."""
    swapped = [arg for arg in SIM_ARGS if not arg.startswith(("protocol.autoencoder.training", "protocol.classifier.mode", "protocol.autoencoder.rounds"))]
    run_dir = run_dir_from(run_graftfl("sim", *swapped, f"protocol.autoencoder.training={ae_training}", "protocol.autoencoder.epochs=3",
                                       "protocol.public_samples=300", "protocol.classifier.mode=offline", cwd=tmp_path, timeout=400), tmp_path)
    rows = read_metrics(run_dir)
    autoencoder_rows = [row for row in rows if row["phase"] == "autoencoder"]
    assert len(autoencoder_rows) == 1 and autoencoder_rows[0]["ae_training"] == ae_training
    assert [row["classifier_mode"] for row in rows if row["phase"] == "classifier"] == ["offline"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ae_training"] == ae_training and summary["rejected_chunks"] == 0
    assert summary["accuracy"] > 0.5  # chance is 0.1
    autoencoders = [torch.load(run_dir / "sites" / site / "autoencoder.pt", weights_only=True)["state"] for site in ("site-0", "site-1")]
    same = all(torch.equal(autoencoders[0][k], autoencoders[1][k]) for k in autoencoders[0])
    assert same == (ae_training == "public")  # local: each site its own autoencoder; public: one for all
