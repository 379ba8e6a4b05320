"""Registry datasets in simulation (issue 12): each virtual site keeps only its own partition, standardized
with fixed (yaml) or federated statistics, never with statistics of rows it does not hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from omegaconf import OmegaConf

from graftfl.clients.site_data import hold_out, site_rows
from graftfl.config import ConfigError, compose_config, conf_dir
from graftfl.core import data as data_module
from graftfl.core.data import load_raw
from graftfl.core.partition import partition_indices
from graftfl.core.normalization import PUBLISHED
from graftfl.server_app.app import phase_plan, run_protocol
from graftfl.strategies.checkpoint import load_checkpoint
from graftfl.strategies.utils import ServerRun
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid

DIGITS = ["dataset=digits", "num_clients=3"]


def site_context(partition_id: int, num_partitions: int = 3) -> Context:
    return Context(run_id=1, node_id=partition_id + 1, node_config={"partition-id": partition_id, "num-partitions": num_partitions},
                   state=RecordDict(), run_config={})


def digits_arrays() -> tuple[np.ndarray, ...]:
    return tuple(np.array(a) for a in data_module.DATASETS["digits"](Path("data"), False))


def with_loader(monkeypatch, arrays) -> None:
    """The registry's digits loader returns ``arrays``; an empty process cache, so the next read uses it."""
    monkeypatch.setitem(data_module.DATASETS, "digits", lambda root, download: tuple(np.array(a) for a in arrays))
    monkeypatch.setattr(data_module, "_CACHE", {})


def rows_of(cfg, partition_id: int) -> np.ndarray:
    labels = torch.from_numpy(digits_arrays()[1].astype(np.int64))
    return partition_indices(labels, cfg.partition, int(cfg.num_clients), partition_id, int(cfg.seed))


@pytest.mark.parametrize("where", ["site", "server"])
def test_a_sites_tensors_do_not_depend_on_other_partitions_pixels(monkeypatch, where):
    cfg = compose_config([*DIGITS, f"eval.where={where}"])
    train_x, train_y, test_x, test_y = digits_arrays()
    with_loader(monkeypatch, (train_x, train_y, test_x, test_y))
    before = site_rows(cfg, site_context(0))

    others = np.setdiff1d(np.arange(len(train_y)), rows_of(cfg, 0))
    changed = train_x.copy()
    changed[others] = 255 - changed[others]  # every other site's pixels, inverted; labels (the partitioning) unchanged
    assert not np.array_equal(changed, train_x) and np.array_equal(changed[rows_of(cfg, 0)], train_x[rows_of(cfg, 0)])
    with_loader(monkeypatch, (changed, train_y, test_x, test_y))
    after = site_rows(cfg, site_context(0))
    for old, new in zip(before, after, strict=True):
        assert (old is None and new is None) or torch.equal(old, new)
    # the check can fail: a site whose own pixels changed does see it
    with_loader(monkeypatch, (train_x, train_y, test_x, test_y))
    own_before = site_rows(cfg, site_context(1))[0]
    with_loader(monkeypatch, (changed, train_y, test_x, test_y))
    assert not torch.equal(own_before, site_rows(cfg, site_context(1))[0])


def test_fixed_normalization_uses_the_yaml_constants(tmp_path):
    cfg = compose_config([*DIGITS, "eval.where=site"])
    assert cfg.dataset.normalization == "fixed" and list(cfg.dataset.mean) == [0.3041] and list(cfg.dataset.std) == [0.3758]
    raw = load_raw("digits", download=False)
    own = torch.from_numpy(raw.train_x[rows_of(cfg, 2)])
    own_x, own_y, own_held_x, own_held_y = hold_out(cfg, own, raw.train_y[torch.from_numpy(rows_of(cfg, 2))], 2)
    train_x, train_y, held_x, held_y = site_rows(cfg, site_context(2))
    assert torch.allclose(train_x, (own_x.float() / 255 - 0.3041) / 0.3758) and torch.equal(train_y, own_y)
    assert torch.allclose(held_x, (own_held_x.float() / 255 - 0.3041) / 0.3758) and torch.equal(held_y, own_held_y)
    # an override of the constants is what the site uses (no pooled statistics behind them)
    other = compose_config([*DIGITS, "eval.where=site", "dataset.mean=[0.5]", "dataset.std=[0.25]"])
    assert torch.allclose(site_rows(other, site_context(2))[0], (own_x.float() / 255 - 0.5) / 0.25)
    # the server's test set: the same constants
    server = ServerRun(compose_config(DIGITS), tmp_path / "run")
    test_x, test_y = server.test_set()
    assert torch.allclose(test_x, (torch.from_numpy(raw.test_x).float() / 255 - 0.3041) / 0.3758) and torch.equal(test_y, raw.test_y)
    assert phase_plan(cfg) == []


def test_every_registry_yaml_documents_the_published_constants():
    for name, (mean, std) in PUBLISHED.items():
        dataset = OmegaConf.load(conf_dir() / "dataset" / f"{name}.yaml").dataset
        assert dataset.normalization == "fixed", name
        assert list(dataset.mean) == list(mean) and list(dataset.std) == list(std), name
    registry = {p.stem for p in (conf_dir() / "dataset").glob("*.yaml")} - {"site"}
    assert registry == set(PUBLISHED)


def test_the_raw_cache_is_read_only_and_sites_get_copies():
    raw = load_raw("digits", download=False)
    assert not raw.train_x.flags.writeable and not raw.test_x.flags.writeable
    cfg = compose_config(DIGITS)
    x, _, _, _ = site_rows(cfg, site_context(0))
    x.add_(1000.0)  # a site scribbling on its tensors touches neither the cache nor another read
    assert int(raw.train_x.max()) <= 255 and float(site_rows(cfg, site_context(0))[0].max()) < 100


def federated_run(tmp_path, where: str, name: str):
    cfg = compose_config([*DIGITS, "protocol=fedavg", "rounds=1", "dataset.normalization=federated", f"eval.where={where}",
                          "progress=false", f"output_dir={tmp_path}", f"run_id={name}"])
    assert phase_plan(cfg) == ["normalize"]
    grid = FakeGrid(3, run_id=5)
    with flower_task_identity(run_id=5):
        run_dir = run_protocol(grid, cfg)
    return cfg, grid, run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("where", ["server", "site"])
def test_federated_statistics_over_registry_partitions_equal_pooled_ones(tmp_path, where):
    cfg, grid, run_dir, summary = federated_run(tmp_path, where, "a")
    federated = summary["phases"]["normalize"]
    assert federated["sites"] == 3 and federated["failures"] == []
    # the union of the sites' training rows (held-out rows excluded when the sites evaluate), pooled here
    raw = load_raw("digits", download=False)
    parts = []
    for pid in range(3):
        x = torch.from_numpy(raw.train_x[rows_of(cfg, pid)])
        if where == "site":
            x = hold_out(cfg, x, torch.zeros(len(x), dtype=torch.long), pid)[0]
        parts.append(x)
    pooled = torch.cat(parts).to(torch.float64) / 255
    assert np.allclose(federated["mean"], [float(pooled.mean())], rtol=1e-9)
    assert np.allclose(federated["std"], [float(pooled.std())], rtol=1e-9)
    assert abs(federated["mean"][0] - 0.3041) < 0.01  # near the whole split's figure, but not computed from it
    # each site standardizes its own rows with what the phase installed
    context = grid.contexts[grid.nodes[1]]
    own = torch.from_numpy(raw.train_x[rows_of(cfg, 1)])
    if where == "site":
        own = hold_out(cfg, own, torch.zeros(len(own), dtype=torch.long), 1)[0]
    mean, std = federated["mean"][0], federated["std"][0]
    assert torch.allclose(site_rows(cfg, context)[0], (own.float() / 255 - mean) / std, atol=1e-6)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1].get("eval_where", "server") == where and rows[-1]["accuracy"] > 0.5
    if where == "server":
        return
    # seeded CPU runs stay deterministic (the phase, the held-out draw and the training)
    _, _, again, summary_again = federated_run(tmp_path, where, "b")
    assert summary_again["phases"]["normalize"]["mean"] == federated["mean"]
    first, second = load_checkpoint(run_dir)["model"], load_checkpoint(again)["model"]
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_the_server_standardizes_its_test_set_with_the_federated_statistics(tmp_path):
    run = ServerRun(compose_config([*DIGITS, "dataset.normalization=federated"]), tmp_path / "run")
    assert run.input_shape == (1, 8, 8) and run.num_classes == 10  # shapes need no statistics
    with pytest.raises(RuntimeError, match="normalize phase has not run"):
        run.test_set()
    run.install_statistics([0.25], [0.5])
    raw = load_raw("digits", download=False)
    assert torch.allclose(run.test_set()[0], (torch.from_numpy(raw.test_x).float() / 255 - 0.25) / 0.5)


def test_normalization_config_errors_name_what_is_valid(capsys):
    with pytest.raises(ConfigError, match=r"dataset.normalization must be one of \['fixed', 'federated'\], got 'pooled'"):
        compose_config([*DIGITS, "dataset.normalization=pooled"])
    with pytest.raises(ConfigError, match="dataset.normalization must be one of"):
        compose_config(["dataset=site", "dataset.input_shape=[1,8,8]", "dataset.num_classes=10", "dataset.normalization=global"])
    with pytest.raises(ConfigError, match="federated protocol"):
        compose_config([*DIGITS, "protocol=centralized", "dataset.normalization=federated"])
    with pytest.raises(ConfigError, match="go together"):
        compose_config([*DIGITS, "dataset.std=null"])
    with pytest.raises(ConfigError, match="must be > 0"):
        compose_config([*DIGITS, "dataset.std=[0.0]"])
    # channels are known once the data is read: the CLI refuses before any site starts
    from graftfl.cli import main

    assert main(["sim", *DIGITS, "dataset.mean=[0.1,0.2]", "dataset.std=[0.3,0.3]"]) == 2
    assert "one value or one per channel (1)" in capsys.readouterr().err


def test_a_sites_test_selection_is_the_servers_and_only_it_is_standardized():
    from graftfl.clients.site_data import registry_test_set
    from graftfl.core.split import test_subset

    cfg = compose_config([*DIGITS, "dataset.test_size=50", "seed=5"])
    whole_x, whole_y = registry_test_set(cfg, site_context(0))
    x, y = registry_test_set(cfg, site_context(0), size=50)
    server_x, server_y = test_subset(whole_x, whole_y, 50, 5)
    assert len(y) == 50 < len(whole_y) and torch.equal(x, server_x) and torch.equal(y, server_y)
    assert not torch.equal(y, whole_y[:50])  # a seeded draw, not the first rows
