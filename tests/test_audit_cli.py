"""``audit.record`` and ``graftfl audit --run``: tiny undefended digits runs, recorded by the server, attacked.

The runs go through the real ServerApp pipeline with the in-process grid (each Flower message
handled by the real ClientApp of its node; split batches over the real gRPC data plane), once
per protocol for the module; one slow test does the same through ``graftfl sim``. Attack
budgets are small (``FAST``); every threshold is a baseline measured in the same report
(the random-guess SSIM, AUC 0.5, chance) plus a margin.
"""

from __future__ import annotations

import json

import pytest
import torch

from graftfl.audit.record import load_index
from graftfl.cli import main
from graftfl.config import compose_config
from graftfl.server_app.app import run_protocol
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid

FAST = ["audit.unsplit_rounds=8", "audit.decoder_epochs=5", "audit.inversion_steps=60", "audit.shadows=2", "audit.shadow_epochs=3"]
MARGIN = 0.2
SPLIT_KEY = "11" * 32


def run_in_process(tmp_path, *overrides, num_nodes: int = 2):
    """One tiny digits run through the ServerApp pipeline (in-process grid); its run directory."""
    cfg = compose_config(["dataset=digits", f"num_clients={num_nodes}", "rounds=1", "progress=false", f"output_dir={tmp_path}", *overrides])
    with flower_task_identity(run_id=7):
        return run_protocol(FakeGrid(num_nodes, run_id=7, node_config={"split-key": SPLIT_KEY}), cfg)


def audit(run_dir, capsys, *settings) -> tuple[int, dict | None, str]:
    """``graftfl audit --run run_dir``: exit code, privacy.json (or None) and what it printed."""
    code = main(["audit", "--run", str(run_dir), *FAST, *settings])
    out = capsys.readouterr()
    report = json.loads((run_dir / "privacy.json").read_text()) if (run_dir / "privacy.json").exists() else None
    return code, report, out.out + out.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Recorded runs of split, ushaped and dssgd, and split again without recording (same seed)."""
    root = tmp_path_factory.mktemp("audit_runs")
    return {
        "split": run_in_process(root, "protocol=split", "protocol.turn_batches=8", "audit.record=true"),
        "split_unrecorded": run_in_process(root, "protocol=split", "protocol.turn_batches=8"),
        "split_average": run_in_process(root, "protocol=split", "protocol.handoff=average", "protocol.turn_batches=8", "audit.record=true"),
        "ushaped": run_in_process(root, "protocol=ushaped", "protocol.turn_batches=8", "audit.record=true"),
        # one SGD step on one example per upload, all coordinates: the case the analytic attack is exact for
        "dssgd": run_in_process(root, "protocol=dssgd", "model=mlp", "train.batch_size=1", "train.local_steps=1", "protocol.theta_upload=1.0",
                                "audit.record=true"),
        "dssgd_unrecorded": run_in_process(root, "protocol=dssgd", "model=mlp", "train.batch_size=1", "train.local_steps=1", "protocol.theta_upload=1.0"),
        "fedavg": run_in_process(root, "protocol=fedavg", "model=mlp", "train.batch_size=1", "train.local_steps=1", "audit.record=true"),
    }


def test_split_audit_reconstructs_inputs_from_cut_activations(runs, capsys):
    code, report, printed = audit(runs["split"], capsys)
    assert code == 0, printed
    inversion = report["attacks"]["inversion"]
    assert inversion["tier_a_query_decoder"]["applies"] is False and "handoff=relay" in inversion["tier_a_query_decoder"]["why"]
    assert inversion["ssim"] > inversion["guess_ssim"] + MARGIN
    assert inversion["distance_correlation"] > 0.5
    # labels travel in clear with every split batch
    assert report["attacks"]["label_leakage"]["agreement"] == 1.0 and report["attacks"]["label_leakage"]["auc"] == 1.0
    assert report["summary"]["inversion_ssim"] == inversion["ssim"] and report["summary"]["membership_auc"] is None
    assert "test split" in report["auxiliary_data"]["source"] and "evaluator" in report["evaluator"]
    assert (runs["split"] / "privacy.png").stat().st_size > 0
    assert printed.strip().splitlines()[-1].startswith("privacy: split on digits") and "inversion SSIM" in printed


def test_split_audit_runs_the_query_decoder_when_the_server_holds_the_averaged_bottom(runs, capsys):
    code, report, printed = audit(runs["split_average"], capsys)
    assert code == 0, printed
    tier_a = report["attacks"]["inversion"]["tier_a_query_decoder"]
    assert tier_a["applies"] is True and tier_a["ssim"] > tier_a["guess_ssim"] + MARGIN
    assert load_index(runs["split_average"])["entries"][1]["kind"] == "client_parts"


def test_ushaped_audit_recovers_labels_from_the_returned_gradients(runs, capsys):
    code, report, printed = audit(runs["ushaped"], capsys)
    assert code == 0, printed
    labels = report["attacks"]["label_leakage"]
    assert labels["rows"] >= 100 and labels["positive_share"] < 0.5
    assert labels["auc"] > 0.5 + MARGIN
    assert labels["cluster_accuracy"] > labels["cluster_chance"] + MARGIN
    assert report["summary"]["label_auc"] == labels["auc"]
    assert report["attacks"]["inversion"]["ssim"] > report["attacks"]["inversion"]["guess_ssim"] + MARGIN


def test_dssgd_audit_recovers_the_input_and_label_of_a_one_example_upload(runs, capsys):
    code, report, printed = audit(runs["dssgd"], capsys)
    assert code == 0, printed
    inversion = report["attacks"]["inversion"]
    assert inversion["analytic_fc"]["recovered_share"] == 1.0
    assert inversion["analytic_fc"]["best_match_ssim"] > 0.95 > inversion["analytic_fc"]["guess_ssim"]
    found = inversion["idlg_present_labels"]
    assert found["precision"] == 1.0 and len(found["found"]) == 1
    membership = report["attacks"]["membership"]
    assert membership["members"] == membership["nonmembers"] > 0
    assert 0.0 <= membership["loss_threshold"]["auc"] <= 1.0 and report["summary"]["membership_auc"] == membership["auc"]


def test_fedavg_audit_inverts_a_round_one_update_and_scores_membership(runs, capsys):
    code, report, printed = audit(runs["fedavg"], capsys)
    assert code == 0, printed
    inversion = report["attacks"]["inversion"]
    assert inversion["upload"]["round"] == 1 and inversion["analytic_fc"]["recovered_share"] == 1.0
    assert inversion["analytic_fc"]["best_match_ssim"] > 0.95 > inversion["analytic_fc"]["guess_ssim"]
    assert report["attacks"]["membership"]["offline_lira"]["auc"] is not None and (runs["fedavg"] / "privacy.png").exists()


def test_audit_refuses_a_run_that_recorded_nothing(runs, capsys):
    code, report, printed = audit(runs["split_unrecorded"], capsys)
    assert code != 0 and report is None
    assert "audit.record" in printed and "recorded nothing" in printed


@pytest.mark.parametrize("protocol", ["split", "dssgd"])
def test_recording_does_not_change_what_the_run_computes(runs, protocol):
    recorded = torch.load(runs[protocol] / "checkpoint.pt", weights_only=True)["model"]
    plain = torch.load(runs[f"{protocol}_unrecorded"] / "checkpoint.pt", weights_only=True)["model"]
    assert recorded.keys() == plain.keys()
    for key in recorded:
        assert torch.equal(recorded[key], plain[key]), key
    assert load_index(runs[f"{protocol}_unrecorded"]) is None and load_index(runs[protocol])["entries"]


def test_the_recording_stays_under_audit_max_mb_and_says_it_truncated(tmp_path, capsys):
    cap_mb = 0.2  # a split turn of 8 batches of small_cnn activations is about 1 MB
    run_dir = run_in_process(tmp_path, "protocol=split", "protocol.turn_batches=8", "audit.record=true", f"audit.max_mb={cap_mb}")
    index = load_index(run_dir)
    files = sum(p.stat().st_size for p in (run_dir / "audit").glob("*.pt"))
    assert index["bytes"] <= index["max_bytes"] == int(cap_mb * 2**20)
    assert files <= index["max_bytes"] + 4096 * len(index["entries"])  # torch.save's own framing per file
    assert index["truncated"] is True and index["dropped"]["train frames"]["count"] > 0
    code, report, printed = audit(run_dir, capsys)  # what was kept is still attacked, and the report says it was cut
    assert code == 0, printed
    assert report["recording"]["truncated"] is True and report["attacks"]["inversion"]["recorded_from"]["rows"] > 0


def test_bad_audit_settings_and_missing_runs_get_a_clear_message(tmp_path, runs, capsys):
    code, _, printed = audit(tmp_path / "nope", capsys)
    assert code != 0 and "not a run directory" in printed
    code = main(["audit", "--run", str(runs["split"]), "audit.bogus=1"])
    assert code != 0 and "audit.unsplit_rounds" in capsys.readouterr().err


@pytest.mark.slow
def test_features_audit_inverts_latents_with_the_servers_decoder_and_reidentifies(tmp_path, capsys):
    run_dir = run_in_process(tmp_path, "protocol=features", "protocol.latent_dim=32", "protocol.conv_channels=8", "protocol.autoencoder.training=federated",
                             "protocol.autoencoder.rounds=2", "protocol.autoencoder.local_epochs=2", "protocol.classifier.epochs=2", "audit.record=true")
    code, report, printed = audit(run_dir, capsys)
    assert code == 0, printed
    inversion = report["attacks"]["inversion"]
    assert inversion["attack"] == "server holds the decoder"
    assert inversion["ssim"] > inversion["guess_ssim"] + 0.1
    assert inversion["reidentification"]["rate"] > inversion["reidentification"]["chance"] + 0.5


@pytest.mark.slow
def test_graftfl_sim_records_and_audits_the_same_way(tmp_path, capsys):
    code = main(["sim", "protocol=ushaped", "dataset=digits", "num_clients=2", "rounds=1", "protocol.turn_batches=6", "progress=false",
                 f"output_dir={tmp_path}", "audit.record=true"])
    run_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and run_line.startswith("run: ")
    run_dir = tmp_path / run_line.split("/")[-1]
    index = load_index(run_dir)
    assert sorted(e["partition"] for e in index["entries"]) == [0, 1]
    code, report, printed = audit(run_dir, capsys)
    assert code == 0, printed
    assert report["attacks"]["label_leakage"]["auc"] > 0.5 + MARGIN


def test_privacy_table_reads_its_figures_from_the_runs_json_and_composes_every_undefended_row(runs, capsys, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("privacy_table", Path(__file__).resolve().parent.parent / "benchmarks" / "privacy_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for quick in (True, False):
        for row in table.load_rows(quick):
            overrides = table.row_overrides(row, quick)
            assert "audit.record=true" in overrides
            if row["defence"] == "none":  # the undefended rows run on this checkout as they are
                assert table.refusal(overrides) is None, row["name"]
    assert table.refusal(["protocol=split", "defence.no_such_key=1"]) is not None
    code, report, printed = audit(runs["ushaped"], capsys)
    assert code == 0, printed
    figures = table.figures_of(runs["ushaped"])
    summary = json.loads((runs["ushaped"] / "summary.json").read_text())
    assert figures["label_auc"] == report["summary"]["label_auc"] and figures["inversion_ssim"] == report["summary"]["inversion_ssim"]
    assert figures["mb_per_site"] == (summary["bytes_up"] + summary["bytes_down"]) / 2 / 1e6
    result = {"name": "ushaped", "protocol": "ushaped", "defence": "none", "status": "ok", **figures}
    skipped = {"name": "x", "protocol": "split", "defence": "d", "status": "skipped", "why": "needs defence.x"}
    text = table.markdown([result, skipped], "setting")
    assert f"{figures['label_auc']:.3f}" in text and "needs defence.x" in text
    table.plot([result, skipped], tmp_path / "privacy.png")
    assert (tmp_path / "privacy.png").stat().st_size > 0


def test_a_dpsgd_split_run_is_audited_only_with_its_sites_audit_sampling_seed(tmp_path, capsys, monkeypatch):
    """DP-SGD's Poisson batches come from the OS CSPRNG; a site given an audit seed by its operator draws them so that
    the evaluator (with the same seed and the turn the site reported) knows which records each recorded frame holds:
    the labels the server received match the replayed rows frame for frame, in both rounds, and the audit scores the run."""
    from omegaconf import OmegaConf

    from graftfl.audit.record import load_entry
    from graftfl.clients.split_defences import AUDIT_SAMPLING_ENV, AUDIT_SAMPLING_NODE_CONFIG
    from graftfl.commands.audit_data import NotAuditable, recorded_rows

    cfg = compose_config(["dataset=digits", "num_clients=2", "rounds=2", "progress=false", f"output_dir={tmp_path}", "protocol=split",
                          "privacy=dpsgd", "privacy.noise_multiplier=1.0", "protocol.turn_batches=8", "audit.record=true"])
    monkeypatch.delenv(AUDIT_SAMPLING_ENV, raising=False)
    with flower_task_identity(run_id=7):
        run_dir = run_protocol(FakeGrid(2, run_id=7, node_config={"split-key": SPLIT_KEY, AUDIT_SAMPLING_NODE_CONFIG: "4242"}), cfg)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    entries = [entry for entry in load_index(run_dir)["entries"] if entry["kind"] == "split_turn"]
    assert sorted((entry["round"], entry["partition"]) for entry in entries) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    with pytest.raises(NotAuditable, match=AUDIT_SAMPLING_ENV):  # the evaluator without the seed cannot tell the rows
        recorded_rows(run_cfg, entries[0], load_entry(run_dir, entries[0]))
    assert {(entry["round"], entry["site_turn"]) for entry in entries} == {(1, 1), (2, 2)}  # the turn each site reported
    monkeypatch.setenv(AUDIT_SAMPLING_ENV, "4243")  # a wrong seed does not pass for the right one: every frame's row count is checked
    for entry in entries:
        with pytest.raises(NotAuditable, match="wrong or missing"):
            recorded_rows(run_cfg, entry, load_entry(run_dir, entry))
    monkeypatch.setenv(AUDIT_SAMPLING_ENV, "4242")
    for entry in entries:
        tensors = load_entry(run_dir, entry)
        x, labels = recorded_rows(run_cfg, entry, tensors)
        assert torch.equal(labels, tensors["labels"]) and len(x) == int(tensors["train_rows"].sum()) > 0
    code, report, printed = audit(run_dir, capsys)
    assert code == 0, printed
    assert report["attacks"]["label_leakage"]["auc"] == 1.0  # labels travel in the clear: DP-SGD covers the weights, not them
    assert report["summary"]["inversion_ssim"] is not None


def test_the_audit_replays_the_turn_a_site_completed_not_the_round_after_a_failed_turn(tmp_path, capsys):
    """A site whose round-1 turn crashed keeps no progress, so its round-2 turn draws its first turn's batches: the site
    reports its own count of completed turns, and the evaluator's replay of that turn gives the rows whose labels the
    server received, frame for frame; replaying the round instead does not."""
    from omegaconf import OmegaConf

    from graftfl.audit.record import load_entry
    from graftfl.clients import split as split_client
    from graftfl.commands.audit_data import NotAuditable, recorded_rows
    from tests.test_split_runs import crash_after

    cfg = compose_config(["dataset=digits", "num_clients=2", "rounds=3", "progress=false", f"output_dir={tmp_path}", "protocol=split",
                          "protocol.turn_batches=8", "audit.record=true"])
    grid = FakeGrid(2, run_id=7, node_config={"split-key": SPLIT_KEY}, faults={(1, 100): crash_after(2, split_client.train)})
    with flower_task_identity(run_id=7):
        run_dir = run_protocol(grid, cfg)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    entries = sorted((e for e in load_index(run_dir)["entries"] if e["kind"] == "split_turn"), key=lambda e: (e["partition"], e["round"]))
    assert [(e["partition"], e["round"], e["site_turn"]) for e in entries] == [(0, 2, 1), (0, 3, 2), (1, 1, 1), (1, 2, 2), (1, 3, 3)]
    for entry in entries:
        tensors = load_entry(run_dir, entry)
        x, labels = recorded_rows(run_cfg, entry, tensors)
        assert torch.equal(labels, tensors["labels"]) and len(x) == len(labels) > 0
    # Replaying by the round, which is one turn ahead of what partition 0 drew: in round 2 the 8 batches of 32 rows match
    # the next turn's row counts, so that replay gives other rows without a word; round 3's is refused on the row count.
    by_round = {key: value for key, value in entries[0].items() if key != "site_turn"}
    _, labels = recorded_rows(run_cfg, by_round, load_entry(run_dir, entries[0]))
    assert not torch.equal(labels, load_entry(run_dir, entries[0])["labels"])
    with pytest.raises(NotAuditable, match="do not match the replayed batches"):
        recorded_rows(run_cfg, {key: value for key, value in entries[1].items() if key != "site_turn"}, load_entry(run_dir, entries[1]))
    code, report, printed = audit(run_dir, capsys)
    assert code == 0, printed


def test_a_sites_turn_count_is_untrusted_by_the_server_and_bounded_by_the_evaluator(tmp_path, runs):
    """A site may report anything as its turn count: one that is not a whole number is not recorded (NaN took the server
    down; a NaN metric now has the whole reply refused, tests/test_malformed_replies.py), and a count beyond the round
    (which would have the evaluator replay a quadrillion turns) is refused."""
    from omegaconf import OmegaConf

    from graftfl.audit.record import load_entry
    from graftfl.commands.audit_data import NotAuditable, recorded_rows

    def lie(node, reply):
        if reply.metadata.message_type == "train.split" and not reply.has_error():
            reply.content["metrics"]["site-turn"] = 1.5
        return reply

    cfg = compose_config(["dataset=digits", "num_clients=2", "rounds=1", "progress=false", f"output_dir={tmp_path}", "protocol=split",
                          "protocol.turn_batches=4", "audit.record=true"])
    with flower_task_identity(run_id=7):
        run_dir = run_protocol(FakeGrid(2, run_id=7, node_config={"split-key": SPLIT_KEY}, tamper=lie), cfg)
    entries = [e for e in load_index(run_dir)["entries"] if e["kind"] == "split_turn"]
    assert len(entries) == 2 and all("site_turn" not in e for e in entries)
    recorded = runs["split"]
    entry = next(e for e in load_index(recorded)["entries"] if e["kind"] == "split_turn")
    with pytest.raises(NotAuditable, match="at most one turn a round"):
        recorded_rows(OmegaConf.load(recorded / "config.yaml"), {**entry, "site_turn": 10**15}, load_entry(recorded, entry))
