"""Feature upload against a server that chooses paths and seeds (issue 11, "also in scope")."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from graftfl.clients import features as site
from graftfl.config import compose_config, to_container
from graftfl.strategies.features import FeatureRun
from graftfl.strategies.utils import ServerRun
from tests.conftest import flower_task_identity


@pytest.fixture(autouse=True)
def task_identity():
    with flower_task_identity():
        yield


class NoSiteAnswers:
    """A grid with one site that never answers; it keeps what the server sent."""

    def __init__(self):
        self.sent: list[Message] = []

    def get_node_ids(self):
        return [1]

    def send_and_receive(self, messages, timeout=None):
        self.sent += messages
        return []


def initial_autoencoder(tmp_path: Path, seed: int, rng_before: int) -> dict[str, torch.Tensor]:
    """The weights the federated autoencoder phase starts from (sent in its first message)."""
    cfg = compose_config(["protocol=features", "dataset=digits", "num_clients=1", "protocol.autoencoder.training=federated", "protocol.latent_dim=8", f"seed={seed}"])
    grid = NoSiteAnswers()
    features = FeatureRun(grid, ServerRun(cfg, tmp_path / f"run-{seed}-{rng_before}"))
    torch.manual_seed(rng_before)  # whatever used the global generator before this phase
    with pytest.raises(RuntimeError, match="no site returned"):
        features.federated_autoencoder()
    features.store.close()
    return grid.sent[0].content["arrays"].to_torch_state_dict()


def test_seed_sets_the_federated_autoencoders_initial_weights(tmp_path):
    first, again = initial_autoencoder(tmp_path, 0, rng_before=1), initial_autoencoder(tmp_path, 0, rng_before=2)
    other = initial_autoencoder(tmp_path, 1, rng_before=1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)  # the seed alone decides
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())  # another seed, another start


def upload_message(cfg, run_dir: str) -> Message:
    """The first learning-mode chunk, as a malicious server would send it (its own choice of ``run_dir``)."""
    fields = {"graftfl-config": json.dumps(to_container(cfg)), "phase": "upload", "run_dir": run_dir, "client_id": "site-a",
              "upload_id": "u0", "chunk": 0, "chunk_size": 50, "acknowledged": "[]"}
    return Message(RecordDict({"config": ConfigRecord(fields)}), dst_node_id=1, message_type="train.features")


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize("site_choice", ["node-config", "environment", "nothing"])
def test_site_writes_only_where_it_chose(tmp_path, monkeypatch, site_choice):
    cfg = compose_config(["protocol=features", "dataset=digits", "num_clients=2", "protocol.latent_dim=8", "protocol.autoencoder.epochs=1", "partition.samples_per_client=60"])
    outside = Path(tempfile.gettempdir()) / f"graftfl-server-chose-{os.getpid()}-{site_choice}"  # outside anything the site chose
    mine = tmp_path / "my-site"
    node_config = {"partition-id": 0, "num-partitions": 2}
    monkeypatch.delenv(site.SITES_DIR_ENV, raising=False)
    if site_choice == "node-config":
        node_config["site-dir"] = str(mine)
    elif site_choice == "environment":
        monkeypatch.setenv(site.SITES_DIR_ENV, str(mine))
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    train = Message(RecordDict({"config": ConfigRecord({"graftfl-config": json.dumps(to_container(cfg)), "phase": "autoencoder", "run_dir": str(outside)})}),
                    dst_node_id=1, message_type="train.features")
    try:
        site.train(train, context)
        site.train(upload_message(cfg, str(outside)), context)
        assert files_under(outside) == [], "the site wrote where the server said"
        written = site.site_dir(context) / site.AUTOENCODER_FILE
        assert written.is_file()
        if site_choice != "nothing":
            assert mine in written.parents
        else:  # a private folder of its own, kept for the run's later messages
            assert written.parent.name.startswith("graftfl-site-0-") and site.site_dir(context) == written.parent
            assert (written.parent.stat().st_mode & 0o077) == 0  # mkdtemp: readable by this user only
    finally:
        for path in sorted(files_under(outside), reverse=True):
            path.unlink()
        if site_choice == "nothing" and site.SITE_DIR_STATE in context.state:
            private = Path(str(context.state[site.SITE_DIR_STATE]["path"]))
            for path in files_under(private):
                path.unlink()
            private.rmdir()
