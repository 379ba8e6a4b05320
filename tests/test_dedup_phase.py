"""The ``dedup`` pre-training phase over Flower messages (dedup=psi): exactness, what the server sees, failures.

Three site folders written by ``graftfl prepare-sites`` from ``digits`` with duplicated
patients (pairwise and three-way); :class:`tests.helpers.grid.FakeGrid` delivers every
``query.dedup`` message to the real ClientApp handler, with one persistent ``context.state``
and one node-config ``data-path`` per node. The server side runs through ``run_phases``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from omegaconf import OmegaConf

from graftfl.clients.guard import site_secrets
from graftfl.config import ConfigError, compose_config, group_options
from graftfl.core.dedup import SALT_ENV_VAR, KeySpec, SaltedKeys
from graftfl.core.sitedata import SiteDeclaration, load_site_data
from graftfl.core.wire import DEDUP_RECORD, DROPPED_ROWS
from graftfl.prepare_sites import TRUTH_NAME, prepare_sites
from graftfl.protocols import phase_state_key
from graftfl.server_app.app import phase_plan, run_phases
from graftfl.strategies.utils import ServerRun
from tests.conftest import flower_task_identity
from tests.helpers.grid import FakeGrid
from tests.helpers.leaks import identifier_needles

SALT = "dedup-phase-test-salt-0123456789abcdef"
NUM_SITES = 3
# Node ids in the reverse order of the partitions: the rank must come from partition-id, not node order.
NODES = [300, 200, 100]
SITE_DECLARATION = {"name": "site", "input_shape": [1, 8, 8], "num_classes": 10}


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dedup-sites") / "sites"
    prepare_sites(["dataset=digits", f"num_clients={NUM_SITES}", "partition.samples_per_client=200"], out, duplicate_fraction=0.2)
    return out


@pytest.fixture(autouse=True)
def no_salt_in_environment(monkeypatch):
    monkeypatch.delenv(SALT_ENV_VAR, raising=False)  # the salt comes from each node's config here


def site_config(output_dir: Path, *extra: str):
    """``protocol=fedavg dataset=site dedup=psi`` (the site declaration set by hand until dataset=site exists)."""
    overrides = ["protocol=fedavg", f"num_clients={NUM_SITES}", "dedup=psi", f"output_dir={output_dir}", "run_id=dedup-test"]
    if "site" in group_options("dataset"):
        # normalization fixed: these tests run the dedup phase alone (the federated default adds the normalize phase)
        return compose_config([*overrides, "dataset=site", "dataset.input_shape=[1,8,8]", "dataset.num_classes=10",
                               "dataset.normalization=fixed", *extra])
    cfg = compose_config([*overrides, "dataset=digits", *extra], validate_values=False)
    cfg.dataset = OmegaConf.create(SITE_DECLARATION)
    return cfg


def site_grid(sites: Path, grid_class=FakeGrid, salts: dict[int, str] | None = None, **kwargs) -> FakeGrid:
    grid = grid_class(nodes=NODES, **kwargs)
    for partition, node in enumerate(NODES):
        grid.contexts[node].node_config["data-path"] = str(sites / f"site-{partition}")
        salt = (salts or {}).get(partition, SALT)
        if salt is not None:
            grid.contexts[node].node_config["dedup-salt"] = salt
    return grid


def run_dedup(cfg, grid: FakeGrid) -> tuple[dict, dict, ServerRun]:
    """Run the config's phases through ``run_phases``; the dedup summary and dedup.json."""
    run = ServerRun(cfg, Path(cfg.output_dir) / cfg.run_id)
    with flower_task_identity():
        summaries = run_phases(grid, run)
    assert run._data is None  # the server never loaded a dataset, let alone a site's files
    return summaries["dedup"], json.loads((run.run_dir / "dedup.json").read_text()), run


def site_patients(sites: Path) -> list[list[str]]:
    """Each site's patient id per row, in the load order every protocol's site loader uses."""
    declaration = SiteDeclaration.from_config(SITE_DECLARATION)
    return [load_site_data(sites / f"site-{s}", declaration, f"site-{s}", use_cache=False).patient_ids for s in range(NUM_SITES)]


def holders_of(sites: Path) -> dict[str, list[int]]:
    truth = json.loads((sites / TRUTH_NAME).read_text())
    return {patient: sorted(int(site.split("-")[1]) for site in entry["sites"]) for patient, entry in truth["patients"].items()}


def dropped_rows(grid: FakeGrid, partition: int) -> list[int] | None:
    state = grid.contexts[NODES[partition]].state
    key = phase_state_key("dedup")
    return json.loads(state[key][DROPPED_ROWS]) if key in state else None


def expected_drops(patients: list[list[str]], holders: dict[str, list[int]], live: set[int]) -> list[list[int]]:
    """Site s drops every row of a patient that a lower-ranked *live* site also holds."""
    return [[row for row, patient in enumerate(patients[s]) if any(other < s and other in live for other in holders.get(patient, []))]
            for s in range(NUM_SITES)]


def test_phase_drops_exactly_the_duplicates_and_writes_the_report(sites, tmp_path):
    cfg = site_config(tmp_path)
    assert phase_plan(cfg) == ["dedup"]
    grid = site_grid(sites)
    summary, report, run = run_dedup(cfg, grid)
    patients, holders = site_patients(sites), holders_of(sites)
    assert any(len(h) == 3 for h in holders.values()) and any(len(h) == 2 for h in holders.values())  # pairwise and three-way
    expected = expected_drops(patients, holders, live={0, 1, 2})
    for s in range(NUM_SITES):
        assert dropped_rows(grid, s) == expected[s], f"site {s}"
    assert expected[0] == [] and expected[1] and expected[2]
    # after the drops: every patient at exactly one site, the lowest-ranked that held them; nobody unique dropped
    kept = [{p for row, p in enumerate(patients[s]) if row not in set(expected[s])} for s in range(NUM_SITES)]
    for patient in set().union(*map(set, patients)):
        keepers = [s for s in range(NUM_SITES) if patient in kept[s]]
        assert keepers == [min(holders.get(patient, [s for s in range(NUM_SITES) if patient in patients[s]]))]
    assert sum(len(e) for e in expected) == sum(entry["images"] * (len(h) - 1) for entry, h in
                                                ((json.loads((sites / TRUTH_NAME).read_text())["patients"][p], h) for p, h in holders.items()))
    # what each site then trains and evaluates on (the site loader every protocol calls): exactly the kept rows
    from graftfl.clients.site_data import load_raw_site, site_rows

    for s in range(NUM_SITES):
        context = grid.contexts[NODES[s]]
        after = load_raw_site(cfg, context)
        assert after.patient_ids == [p for row, p in enumerate(patients[s]) if row not in set(expected[s])], f"site {s}"
        _, train_y, _, held_y = site_rows(cfg, context)
        assert len(train_y) + (0 if held_y is None else len(held_y)) == len(patients[s]) - len(expected[s])
    # dedup.json: per pair the overlap, drops, bytes and seconds
    truth_pairs = json.loads((sites / TRUTH_NAME).read_text())["pairs"]
    assert [p["pair"] for p in report["pairs"]] == [[0, 1], [0, 2], [1, 2]] and report["not_checked"] == []
    for pair in report["pairs"]:
        i, j = pair["pair"]
        assert pair["status"] == "ok"
        assert pair["overlap_patients"] == truth_pairs.get(f"site-{i},site-{j}", 0)
        assert pair["dropped_records"][str(i)] == 0
        assert pair["dropped_records"][str(j)] == sum(1 for p in patients[j] if i in holders.get(p, []))
        assert pair["bytes_relayed"] > 0 and pair["seconds"] >= 0
    assert [site["dropped_records"] for site in report["sites"]] == [len(e) for e in expected]
    assert {n["node_id"]: n["rank"] for n in report["nodes"]} == {300: 0, 200: 1, 100: 2}
    # totals: the summary, the round-0 metrics row and dedup.json agree
    assert summary["dropped_records"] == report["totals"]["dropped_records"] == sum(len(e) for e in expected)
    assert summary["pairs_checked"] == 3 and summary["pairs_not_checked"] == 0 and summary["failed_sites"] == []
    row = json.loads((run.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["round"] == 0 and row["phase"] == "dedup" and row["accuracy"] is None
    assert row["dedup_dropped_records"] == summary["dropped_records"] and row["dedup_overlap_patients"] == summary["overlap_patients"]
    assert row["bytes_up"] == summary["bytes_up"] > 0 and row["bytes_down"] == summary["bytes_down"] > 0
    # three steps: every site gets 'request', two serve, two finish
    steps = [m.content[DEDUP_RECORD]["step"] for m in grid.sent]
    assert steps.count("request") == 3 and steps.count("serve") == 2 and steps.count("finish") == 2
    assert all("rank" not in m.content[DEDUP_RECORD] for m in grid.sent if m.content[DEDUP_RECORD]["step"] == "request")


def _serialized(message) -> bytes:
    """The bytes Flower sends for a message (every nested object, as pushed)."""
    return b"".join(obj.deflate() for obj in get_all_nested_objects(message).values())


def test_messages_the_server_relayed_hold_no_identifier_nor_unsalted_hash(sites, tmp_path):
    grid = site_grid(sites)
    run_dedup(site_config(tmp_path), grid)
    transcript = b"\n".join(_serialized(message) for message in [*grid.sent, *grid.replies])
    assert len(grid.sent) == 7 and len(grid.replies) == 7 and len(transcript) > 10_000
    spec, salted = KeySpec(), SaltedKeys.from_salt(SALT)
    patients = sorted(set().union(*map(set, site_patients(sites))))
    assert len(patients) > 100
    needles = [SALT.encode(), salted.mac_key, salted.element_key]
    for patient in patients:
        needles += [*identifier_needles(patient, spec, salted), patient[1:].encode()]
    found = [needle for needle in needles if needle in transcript]
    assert not found, f"the relayed messages leak {found[:3]}"
    # nor the rows dropped: only counts go up (each site's dropped-rows stay in its context.state)
    report_texts = [dict(r.content[DEDUP_RECORD]).get("report") for r in grid.replies]
    for text in filter(None, report_texts):
        assert set(json.loads(text)) <= {"rank", "records", "patients", "elements", "dropped_records", "pairs", "errors"}


class FailingGrid(FakeGrid):
    """A FakeGrid whose node ``fail[0]`` raises at dedup step ``fail[1]`` (what a crashed ClientApp replies)."""

    def __init__(self, *args, fail: tuple[int, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fail = fail

    def handler_for(self, message):
        if (message.metadata.dst_node_id, message.content[DEDUP_RECORD]["step"]) == self.fail:
            def broken(message, context):
                raise OSError("site disk failed")
            return broken
        return super().handler_for(message)


def test_a_site_failing_mid_phase_is_reported_and_the_other_pairs_apply(sites, tmp_path):
    grid = site_grid(sites, FailingGrid, fail=(NODES[1], "serve"))
    summary, report, _ = run_dedup(site_config(tmp_path), grid)
    patients, holders = site_patients(sites), holders_of(sites)
    expected = expected_drops(patients, holders, live={0, 2})
    assert dropped_rows(grid, 2) == expected[2] and expected[2]  # site 2 still drops site 0's patients
    assert dropped_rows(grid, 1) == [] and dropped_rows(grid, 0) == []  # site 1 never finished: it keeps everything
    assert report["not_checked"] == [[0, 1], [1, 2]] and summary["not_checked"] == [[0, 1], [1, 2]]
    assert report["sites"][1]["status"] == "failed" and "site disk failed" in report["sites"][1]["error"]
    assert "serve" in report["sites"][1]["error"]
    assert summary["failed_sites"] == [1] and summary["pairs_checked"] == 1
    reasons = {tuple(p["pair"]): p.get("reason", "") for p in report["pairs"]}
    assert "site 1 failed" in reasons[(0, 1)] and "site 1 failed" in reasons[(1, 2)]


def test_a_silent_site_times_out_and_the_pair_of_the_others_applies(sites, tmp_path):
    grid = site_grid(sites, silent={NODES[2]})
    summary, report, _ = run_dedup(site_config(tmp_path, "timeout_s=1"), grid)
    patients, holders = site_patients(sites), holders_of(sites)
    assert dropped_rows(grid, 1) == expected_drops(patients, holders, live={0, 1})[1] != []
    assert dropped_rows(grid, 2) is None  # it never answered: no phase state there
    assert report["not_checked"] == [[0, 2], [1, 2]] and summary["failed_sites"] == [2]
    assert "no site reported partition-id 2" in report["sites"][2]["error"] and "timeout" in report["sites"][2]["error"]
    assert {n["node_id"]: n.get("error", "") for n in report["nodes"]}[NODES[2]].startswith("request: no reply")


def test_sites_with_another_salt_find_nothing_and_say_why(sites, tmp_path):
    """A site outside the federation (another salt) cannot match anyone: its pairs are refused, nothing dropped."""
    grid = site_grid(sites, salts={2: "another-federation-salt-0123456789"})
    _, report, _ = run_dedup(site_config(tmp_path), grid)
    patients, holders = site_patients(sites), holders_of(sites)
    assert dropped_rows(grid, 2) == []
    assert dropped_rows(grid, 1) == expected_drops(patients, holders, live={0, 1})[1]
    assert sorted(report["not_checked"]) == [[0, 2], [1, 2]]
    assert all("authentication failed" in p["reason"] for p in report["pairs"] if p["status"] == "not_checked")


def test_a_site_without_a_salt_refuses_and_the_server_cannot_supply_one(sites, tmp_path):
    grid = site_grid(sites, salts={0: None, 1: None, 2: None})
    summary, report, _ = run_dedup(site_config(tmp_path), grid)
    assert summary["pairs_checked"] == 0 and summary["failed_sites"] == [0, 1, 2]
    assert all("dedup-salt" in node["error"] for node in report["nodes"])
    assert all(dropped_rows(grid, s) is None for s in range(NUM_SITES))


def test_near_duplicate_images_are_matched_too(sites, tmp_path):
    """``dedup.images=phash``: the copied images (identical pixels) match on hash bands; patient drops still apply."""
    grid = site_grid(sites)
    summary, report, _ = run_dedup(site_config(tmp_path, "dedup.images=phash", "dedup.image_bands=4"), grid)
    patients, holders = site_patients(sites), holders_of(sites)
    expected = expected_drops(patients, holders, live={0, 1, 2})
    for s in range(NUM_SITES):
        assert set(expected[s]) <= set(dropped_rows(grid, s))  # image matches can only add drops
    for pair in report["pairs"]:
        i, j = pair["pair"]
        copies = sum(1 for p in patients[j] if i in holders.get(p, []))
        assert pair["status"] == "ok" and pair["matched_images"] >= copies > 0
    assert summary["matched_images"] == sum(p["matched_images"] for p in report["pairs"])


def test_composite_key_from_manifest_columns(tmp_path):
    """``dedup.key=name|birth_date`` reads the manifest's own columns; differently written values still match."""
    from tests.site_fixtures import manifest_folder

    people = [("Alice Smith", "1990-01-02"), ("Bob Jones", "1985-05-05"), ("Carol King", "1970-07-07")]
    spellings = [lambda n: n, lambda n: f"  {n.upper()} "]
    for s, held in enumerate([[0, 1], [1, 2]]):
        rows = [{"path": f"{k}/{s}-{n}-{k}.png", "label": str(k), "patient_id": f"S{s}-{n}", "name": spellings[s](people[n][0]),
                 "birth_date": people[n][1], "split": "train"} for n in held for k in range(2)]
        manifest_folder(tmp_path / "sites" / f"site-{s}", rows, seed=s)
    cfg = site_config(tmp_path, "num_clients=2", "dedup.key=name|birth_date")
    grid = FakeGrid(nodes=[10, 11])
    for s, node in enumerate([10, 11]):
        grid.contexts[node].node_config.update({"data-path": str(tmp_path / "sites" / f"site-{s}"), "dedup-salt": SALT})
    _, report, _ = run_dedup(cfg, grid)
    assert report["pairs"][0]["overlap_patients"] == 1  # Bob Jones, whose patient ids differ per site
    assert json.loads(grid.contexts[11].state[phase_state_key("dedup")][DROPPED_ROWS]) == [0, 1]


def test_dedup_config_is_checked_before_training(tmp_path):
    with pytest.raises(ConfigError, match="dedup=psi needs dataset=site"):
        compose_config(["protocol=fedavg", "dataset=digits", "dedup=psi"])
    with pytest.raises(ConfigError, match="need a federated protocol"):
        compose_config(["protocol=centralized", "dataset=digits", "dedup=psi"])
    with pytest.raises(ConfigError, match="runs with dedup=psi"):
        compose_config(["protocol=fedavg", "dataset=digits", "phases=[dedup]"])
    with pytest.raises(ConfigError, match=r"unknown dedup 'pis'; valid dedup choices: \['none', 'psi'\]"):
        compose_config(["dataset=digits", "dedup=pis"])
    with pytest.raises(ConfigError, match="unknown config key 'dedup.keys'"):
        compose_config(["dataset=digits", "dedup=psi", "dedup.keys=x"])
    assert compose_config(["dataset=digits"]).dedup.name == "none"
    assert phase_plan(compose_config(["dataset=digits"])) == []
    if "site" in group_options("dataset"):
        with pytest.raises(ConfigError, match="fpr"):
            compose_config(["protocol=fedavg", "dataset=site", "dataset.input_shape=[1,8,8]", "dataset.num_classes=10",
                            "dedup=psi", "dedup.data_structure=gcs", "dedup.fpr=0.01"])


def test_the_salt_is_a_site_secret_scrubbed_from_errors(monkeypatch):
    from flwr.app import Context, RecordDict

    context = Context(run_id=1, node_id=1, node_config={"dedup-salt": SALT}, state=RecordDict(), run_config={})
    assert SALT in site_secrets(context)
    monkeypatch.setenv(SALT_ENV_VAR, "environment-salt-0123456789abcdef")
    assert "environment-salt-0123456789abcdef" in site_secrets(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))


def test_deploy_local_gives_the_salt_to_the_supernodes_only(tmp_path, monkeypatch):
    from graftfl.deploy.local import LocalDeployment

    monkeypatch.setenv(SALT_ENV_VAR, "caller-chosen-salt-0123456789")
    first = LocalDeployment(tmp_path / "a", num_nodes=1)
    assert first.env(supernode=True)[SALT_ENV_VAR] == "caller-chosen-salt-0123456789"  # the caller's salt wins
    assert SALT_ENV_VAR not in first.env()  # SuperLink, ServerApp, flwr CLI: never
    monkeypatch.delenv(SALT_ENV_VAR)
    salts = {LocalDeployment(tmp_path / name, num_nodes=1).env(supernode=True)[SALT_ENV_VAR] for name in "bcd"}
    assert len(salts) == 3 and all(len(bytes.fromhex(salt)) == 32 for salt in salts)  # fresh per run
    assert SALT_ENV_VAR not in os.environ


# -- the same phase under `graftfl sim` and `graftfl deploy-local` ---------------------------------------------


def _pair_counts(run_dir: Path) -> dict:
    report = json.loads((run_dir / "dedup.json").read_text())
    return {"pairs": [(tuple(p["pair"]), p["status"], p.get("overlap_patients"), p.get("dropped_records")) for p in report["pairs"]],
            "sites": [(site["rank"], site["status"], site.get("dropped_records"), site.get("patients")) for site in report["sites"]],
            "totals": {k: report["totals"][k] for k in ("overlap_patients", "dropped_records", "pairs_checked", "pairs_not_checked")}}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="deploy-local's process checks need Linux /proc")
def test_sim_and_deploy_local_give_the_same_dedup_and_then_train(tmp_path, sites):
    """``dedup=psi`` under ``graftfl sim --data-dir`` and ``graftfl deploy-local --data-dir``: same counts, right counts, training after.

    The deployment is also the suite's fedavg deployment on site folders (one deployment proving both): insecure,
    every SuperNode trains on its own folder, the ServerApp's config names no data location, evaluation at the sites.
    """
    from tests.conftest import run_dir_from, run_graftfl
    from tests.test_deploy_local import assert_deployment, assert_run_directory, run_deploy_local
    from tests.test_site_sim_deploy import assert_site_run

    args = ["--data-dir", str(sites), "protocol=fedavg", "dataset=site", "dataset.input_shape=[1,8,8]", "dataset.num_classes=10",
            f"num_clients={NUM_SITES}", "rounds=1", "dedup=psi"]
    simulated = run_dir_from(run_graftfl("sim", *args, cwd=tmp_path, timeout=600), tmp_path)
    deployed, stderr = run_deploy_local(args, tmp_path, timeout=600)
    assert _pair_counts(simulated) == _pair_counts(deployed)  # consistency: the same phase, two runtimes
    holders = holders_of(sites)
    truth_pairs = json.loads((sites / TRUTH_NAME).read_text())["pairs"]
    patients = site_patients(sites)
    expected = expected_drops(patients, holders, live={0, 1, 2})
    for run_dir in (simulated, deployed):
        counts = _pair_counts(run_dir)
        assert [overlap for _, _, overlap, _ in counts["pairs"]] == [truth_pairs.get(f"site-{i},site-{j}", 0) for i, j in ((0, 1), (0, 2), (1, 2))]
        assert [dropped for _, _, dropped, _ in counts["sites"]] == [len(e) for e in expected]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert [row["round"] for row in rows] == [0, 1] and rows[0]["phase"] == "dedup"  # the phase, then training
        assert rows[1]["bytes_up"] > 0
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["phases"]["dedup"]["dropped_records"] == sum(len(e) for e in expected) and summary["rounds"] == 1
    # fedavg on a real deployment with site folders
    assert_site_run(deployed, sites, "fedavg", 0.2)
    assert_deployment(stderr, assert_run_directory(deployed, num_clients=NUM_SITES, rounds=1, dataset="site"), num_nodes=NUM_SITES)
    trained = [json.loads(line) for line in (deployed / "metrics.jsonl").read_text().splitlines() if line.strip()][1]
    assert sorted(trained["clients"]) == [0, 1, 2]  # every SuperNode trained, each on its own folder
