"""dataset=site through every protocol in process (FakeGrid): sites read their own folders, the server none.

The ServerApp code runs in this process and the sites' handlers too, so file opens are told
apart by who is running: every handler call is marked as "site", everything else is the
server. An audit hook records every ``open`` under the sites' folder with that mark.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from graftfl.cli import main as graftfl_main
from graftfl.config import ConfigError, compose_config
from graftfl.core.sitedata import SiteDeclaration, load_site_data
from graftfl.server_app.app import phase_plan, run_protocol
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid
from tests.site_fixtures import image_folder, write_png

SPLIT_KEY = "22" * 32
SITE = ["dataset=site", "dataset.input_shape=[1,8,8]", "dataset.num_classes=10"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "sites"
    assert graftfl_main(["prepare-sites", "dataset=digits", "num_clients=3", f"out={out}"]) == 0
    return out


@pytest.fixture(autouse=True)
def task_identity():
    with flower_task_identity(run_id=5):
        yield


class OpenRecorder:
    """Records ``open`` events under ``root``, tagged ``site`` inside a site handler, else ``server``."""

    def __init__(self, root: Path):
        self.root, self.events, self.local = str(root.resolve()), [], threading.local()
        sys.addaudithook(self.hook)

    def hook(self, event, args):
        if event == "open" and getattr(self, "active", True) and args and isinstance(args[0], (str, bytes, Path)):
            path = str(args[0] if not isinstance(args[0], bytes) else args[0].decode(errors="replace"))
            if path.startswith(self.root):
                self.events.append(("site" if getattr(self.local, "site", False) else "server", path))

    def wrap(self, handler):
        def run(message, context):
            self.local.site = True
            try:
                return handler(message, context)
            finally:
                self.local.site = False

        return run


_recorders: list[OpenRecorder] = []


def site_grid(sites: Path, num_nodes: int = 3, recorder: OpenRecorder | None = None, data_paths: dict | None = None) -> FakeGrid:
    grid = FakeGrid(num_nodes, run_id=5, node_config={"split-key": SPLIT_KEY})
    for index, node in enumerate(grid.nodes):
        path = (data_paths or {}).get(index, str(sites / f"site-{index}"))
        if path is not None:
            grid.contexts[node].node_config["data-path"] = path
    if recorder is not None:
        original = grid.handler_for
        grid.handler_for = lambda message: recorder.wrap(original(message))
    return grid


def run_sites(tmp_path, grid, *overrides):
    cfg = compose_config([*SITE, f"num_clients={len(grid.nodes)}", "progress=false", f"output_dir={tmp_path}", *overrides])
    run_dir = run_protocol(grid, cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows, json.loads((run_dir / "summary.json").read_text())


PROTOCOL_RUNS = {
    "fedavg": ["protocol=fedavg", "rounds=3"],
    "split": ["protocol=split", "protocol.handoff=relay", "rounds=2", "protocol.turn_batches=12"],
    "dssgd": ["protocol=dssgd", "rounds=3", "protocol.theta_upload=1.0", "protocol.theta_download=1.0", "protocol.selection=largest"],
    "features": ["protocol=features", "protocol.autoencoder.epochs=1"],
}


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_RUNS))
def test_site_data_trains_every_protocol_and_the_server_opens_no_site_file(tmp_path, sites, protocol):
    if not _recorders:
        _recorders.append(OpenRecorder(sites))
    recorder = _recorders[0]
    recorder.events.clear()
    grid = site_grid(sites, recorder=recorder)
    run_dir, rows, summary = run_sites(tmp_path, grid, *PROTOCOL_RUNS[protocol])
    # the sites read their folders, the server process's own code never
    assert any(who == "site" for who, _ in recorder.events), "the sites should have read their data"
    assert [path for who, path in recorder.events if who == "server"] == []
    assert "data-path" not in (run_dir / "config.yaml").read_text() and str(sites) not in (run_dir / "config.yaml").read_text()
    # the federated normalization ran first, for every site
    assert summary["phases"]["normalize"]["sites"] == 3 and summary["phases"]["normalize"]["failures"] == []
    if protocol == "features":  # service mode: the server labels each site's held-out latents, the sites score them
        print("features summary", {k: v for k, v in summary.items() if "accuracy" in k})
        assert summary["accuracy"] > 0.3, summary["accuracy"]
        return
    last = rows[-1]
    assert last["eval_where"] == "site" and sorted(last["eval_clients"]) == [0, 1, 2]
    assert all(count > 0 for count in last["eval_client_count"])
    accuracy = last["accuracy"] if protocol != "dssgd" else last["global_accuracy"]
    assert accuracy > 0.3, f"{protocol} on site data: accuracy {accuracy} is near chance (0.1)"
    pooled = sum(a * c for a, c in zip(last["eval_client_accuracy"], last["eval_client_count"], strict=True)) / sum(last["eval_client_count"])
    assert abs(pooled - accuracy) < 1e-9


def test_federated_statistics_equal_pooled_ones(tmp_path, sites):
    grid = site_grid(sites)
    _, _, summary = run_sites(tmp_path, grid, "protocol=fedavg", "rounds=1")
    declaration = SiteDeclaration((1, 8, 8), 10)
    train_parts = []
    for index in range(3):
        data = load_site_data(sites / f"site-{index}", declaration, f"site-{index}", site_fraction=0.1, seed=0)
        train_parts.append(data.x[~data.test_mask])
    pooled = torch.cat(train_parts).to(torch.float64)
    federated = summary["phases"]["normalize"]
    assert np.allclose(federated["mean"], [float(pooled.mean())], rtol=1e-9)
    assert np.allclose(federated["std"], [float(pooled.std())], rtol=1e-9)
    # and what each site stored is what it standardizes with
    from graftfl.protocols import phase_state_key

    stored = grid.contexts[grid.nodes[0]].state[phase_state_key("normalize")]
    assert np.allclose(json.loads(stored["mean"]), federated["mean"])


def test_fixed_normalization_runs_no_phase(tmp_path, sites):
    cfg = compose_config([*SITE, "dataset.normalization=fixed", "dataset.mean=[0.3]", "dataset.std=[0.4]"])
    assert phase_plan(cfg) == []
    assert phase_plan(compose_config(SITE)) == ["normalize"]
    _, rows, summary = run_sites(tmp_path, site_grid(sites), "protocol=fedavg", "rounds=1", "dataset.normalization=fixed")
    assert "phases" not in summary and rows[-1]["eval_where"] == "site"


def test_site_dataset_config_errors():
    with pytest.raises(ConfigError, match="input_shape"):
        compose_config(["dataset=site"])
    with pytest.raises(ConfigError, match="eval.where=site"):
        compose_config([*SITE, "eval.where=server"])
    with pytest.raises(ConfigError, match="federated protocol"):
        compose_config([*SITE, "protocol=centralized"])


def _bad_site(tmp_path: Path, kind: str) -> tuple[dict, str]:
    """Site 1's data-path for each failure, and what its error must name."""
    folder = tmp_path / kind
    if kind == "missing-data-path":
        return {1: None}, "data-path"
    if kind == "empty-folder":
        folder.mkdir()
        return {1: str(folder)}, str(folder)
    if kind == "wrong-shape":
        image_folder(folder, {"0": 3, "1": 3})
        bad = write_png(folder / "1" / "big.png", np.zeros((12, 12), dtype=np.uint8))
        return {1: str(folder)}, str(bad)
    if kind == "unknown-class":
        image_folder(folder, {"0": 3, "zebra": 3})
        return {1: str(folder)}, "zebra"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing-data-path", "empty-folder", "wrong-shape", "unknown-class"])
def test_a_bad_site_is_that_sites_failure_with_a_clear_error(tmp_path, sites, kind):
    paths, named = _bad_site(tmp_path, kind)
    grid = site_grid(sites, data_paths=paths)
    _, rows, summary = run_sites(tmp_path, grid, "protocol=fedavg", "rounds=1", "dataset.classes=[0,1,2,3,4,5,6,7,8,9]")
    failures = summary["phases"]["normalize"]["failures"]
    if kind == "missing-data-path":
        assert "node-config key" in failures[0] and "is not set" in failures[0]
    assert len(failures) == 1 and f"node {grid.nodes[1]}" in failures[0] and "site-1" in failures[0] and named in failures[0], failures
    # the other sites trained; the bad one is the round's failure, not the server's
    assert rows[-1]["failed_clients"] == 1 and "site-1" in rows[-1]["client_errors"][0]
    assert sorted(rows[-1]["eval_clients"]) == [0, 2]


def _context(node_config: dict):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 3, **node_config}, state=RecordDict(), run_config={})


def test_site_loader_applies_dedup_drops_and_the_sim_data_dir(sites, monkeypatch):
    from flwr.app import ConfigRecord

    from graftfl.clients.site_data import DATA_DIR_ENV, load_raw_site, site_rows
    from graftfl.protocols import phase_state_key

    cfg = compose_config([*SITE, "dataset.normalization=fixed"])
    monkeypatch.setenv(DATA_DIR_ENV, str(sites))  # graftfl sim --data-dir: site-<partition-id>
    context = _context({})
    whole = load_raw_site(cfg, context)
    assert whole.files == load_site_data(sites / "site-1", SiteDeclaration((1, 8, 8), 10), "x", site_fraction=0.1, seed=0).files
    context.state[phase_state_key("dedup")] = ConfigRecord({"dropped-rows": json.dumps([0, 5, 7])})
    kept = load_raw_site(cfg, context)
    assert len(kept) == len(whole) - 3 and kept.files == [f for i, f in enumerate(whole.files) if i not in (0, 5, 7)]
    _, train_y, _, held_y = site_rows(cfg, context)
    assert len(train_y) + len(held_y) == len(kept) and len(held_y) == int(kept.test_mask.sum())
    # a node-config data-path wins over the environment
    assert load_raw_site(cfg, _context({"data-path": str(sites / "site-2")})).files != whole.files


def test_registry_data_root_is_honoured_at_the_site(tmp_path):
    from graftfl.clients.site_data import registry_raw
    from graftfl.core.data import DatasetUnavailable

    cfg = compose_config(["dataset=mnist", "dataset.download=false"])
    with pytest.raises((DatasetUnavailable, FileNotFoundError, RuntimeError)) as missing:
        registry_raw(cfg, _context({"data-root": str(tmp_path / "site-own-root")}))
    assert "site-own-root" in str(missing.value)


def test_registry_datasets_keep_server_evaluation_unless_eval_where_site(tmp_path):
    from graftfl.config import eval_where
    from graftfl.core.data import dataset_from_config

    for protocol in ("fedavg", "dssgd", "features"):
        assert eval_where(compose_config(["dataset=digits", f"protocol={protocol}"])) == "server"
    for protocol in ("split", "ushaped", "semisup"):
        assert eval_where(compose_config(["dataset=digits", f"protocol={protocol}"])) == "site"
    cfg = compose_config(["dataset=digits", "protocol=fedavg", "num_clients=2", "rounds=2", "eval.where=site", "progress=false", f"output_dir={tmp_path}"])
    grid = FakeGrid(2, run_id=5)
    run_dir = run_protocol(grid, cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(m.metadata.message_type == "evaluate.fedavg" for m in grid.sent)
    assert rows[-1]["eval_where"] == "site" and rows[-1]["eval_clients"] == [0, 1] and rows[-1]["accuracy"] > 0.5
    # held-out rows never train: each site trained on its partition minus what it evaluates on
    trained = sum(int(m.content["metrics"]["num-examples"]) for _, m in grid.log if m.metadata.message_type == "train.fedavg") // 2
    assert trained + sum(rows[-1]["eval_client_count"]) == len(dataset_from_config(cfg.dataset).train_y)
