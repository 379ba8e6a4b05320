"""A site's Flower reply is untrusted: a malformed one is refused and the run goes on.

Each attack rewrites the reply of node 100 (partition 0) in the in-process grid, in every
round: a missing record, a NaN or infinite metric, a count that is not a whole number, a
hand-off of the wrong type, averaged parts of another shape or with NaN, autoencoder weights
with NaN. Before these checks every one of them stopped the server (a KeyError, int(nan), a
TypeError) or, in ``handoff=average``, made every later turn of every site fail. FedAvg's and
DSSGD's uploads have their own attack tests (tests/test_fedavg_replies.py, test_dssgd_protocol.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message

from graftfl.config import compose_config
from graftfl.server_app.app import run_protocol
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid

ATTACKER = 100
SPLIT = ["protocol=split", "protocol.turn_batches=2"]
AVERAGE = ["protocol=split", "protocol.handoff=average", "protocol.turn_batches=2"]
FEATURES = ["protocol=features", "protocol.latent_dim=8", "protocol.autoencoder.epochs=1", "protocol.classifier.epochs=1"]
FEDERATED_AE = [*FEATURES, "protocol.autoencoder.training=federated", "protocol.autoencoder.rounds=1", "protocol.autoencoder.local_epochs=1"]


def drop(name: str):
    def attack(content):
        del content[name]
    return attack


def metric(key: str, value):
    def attack(content):
        content["metrics"][key] = value
    return attack


def relay_text(content):
    content["handoff"] = ConfigRecord({"relay-ciphertext": "not bytes"})


def declared(data_of):
    """The first array of the reply's first ArrayRecord keeps its declared dtype and shape; its bytes become ``data_of(array)``."""
    def attack(content):
        record = next(iter(content.array_records.values()))
        key = next(iter(record.keys()))
        array = record[key]
        record[key] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=data_of(array))
    return attack


OTHER_SHAPE = declared(lambda array: Array(np.zeros(2)).data)  # a float64 [2] behind a float32 [16, 1, 3, 3] label
GARBAGE = declared(lambda array: b"not an npy payload")
ZIP = declared(lambda array: b"PK\x03\x04" + b"\x00" * 40)  # numpy's loader opens this as a zip archive (BadZipFile)
EMPTY = declared(lambda array: b"")


def parts(change):
    """Every array of the reply's first ArrayRecord (the averaged parts, the autoencoder) rewritten by ``change``."""
    def attack(content):
        record = next(iter(content.array_records.values()))
        first = next(iter(record.keys()))
        for key in list(record.keys()):
            record[key] = Array(change(key == first, record[key].numpy()))
    return attack


ATTACKS = {
    "split, no metrics record": (SPLIT, "train.split", drop("metrics"), "no MetricRecord 'metrics'"),
    "split, NaN partition id": (SPLIT, "train.split", metric("partition-id", float("nan")), "partition-id must be whole numbers >= 0, got [nan]"),
    "split, infinite samples": (SPLIT, "train.split", metric("samples", float("inf")), "samples must be whole numbers >= 0, got [inf]"),
    "split, negative steps": (SPLIT, "train.split", metric("steps", -1), "steps must be whole numbers >= 0"),
    "split, no hand-off": (SPLIT, "train.split", drop("handoff"), "no relay ciphertext"),
    "split, hand-off not bytes": (SPLIT, "train.split", relay_text, "no relay ciphertext"),
    "ushaped, no metrics record": (["protocol=ushaped", "protocol.handoff=local", "protocol.turn_batches=2"], "train.ushaped", drop("metrics"),
                                   "no MetricRecord 'metrics'"),
    "average, parts of another shape": (AVERAGE, "train.split", parts(lambda first, a: np.zeros((3, 3), a.dtype) if first else a), "expected float32"),
    "average, NaN parts": (AVERAGE, "train.split", parts(lambda first, a: np.full_like(a, np.nan) if a.dtype.kind == "f" else a), "non-finite"),
    "average, a huge sample count": (AVERAGE, "train.split", metric("samples", 1e18), "exceed the turn's 2 batches"),
    "average, data that is not its declared shape": (AVERAGE, "train.split", OTHER_SHAPE, "(declared float32[16, 1, 3, 3])"),
    "average, bytes that are not an array": (AVERAGE, "train.split", GARBAGE, "cannot be read as an array"),
    "average, bytes numpy would open as a zip archive": (AVERAGE, "train.split", ZIP, "cannot be read as an array"),
    "split, a list where a number belongs": (SPLIT, "train.split", metric("client_flops", [1.0, 2.0]), "are lists, not numbers"),
    "features, a list where a number belongs": (FEATURES, "train.features", metric("ae_loss", [1.0]), "are lists, not numbers"),
    "features, no metrics record": (FEATURES, "train.features", drop("metrics"), "no MetricRecord 'metrics'"),
    "features, NaN partition id": (FEATURES, "train.features", metric("partition-id", float("nan")), "partition-id must be whole numbers >= 0, got [nan]"),
    "features, NaN federated autoencoder": (FEDERATED_AE, "train.features", parts(lambda first, a: np.full_like(a, np.nan) if a.dtype.kind == "f" else a),
                                            "non-finite"),
}


def attacked_run(tmp_path, overrides: list[str], message_type: str, attack, num_clients: int = 2) -> tuple[dict, list[dict]]:
    """A 2-round digits run in which node 100's replies of ``message_type`` go through ``attack``: its summary and rows."""
    def tamper(node: int, reply: Message) -> Message:
        if node == ATTACKER and reply.metadata.message_type == message_type and not reply.has_error():
            attack(reply.content)
        return reply

    cfg = compose_config(["dataset=digits", f"num_clients={num_clients}", "rounds=2", "progress=false", f"output_dir={tmp_path}", *overrides])
    with flower_task_identity(run_id=7):
        run_dir = run_protocol(FakeGrid(num_clients, run_id=7, node_config={"split-key": "44" * 32}, tamper=tamper), cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run_dir / "summary.json").read_text()), rows


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_malformed_reply_is_refused_with_its_reason_and_the_run_goes_on(tmp_path, name):
    overrides, message_type, attack, reason = ATTACKS[name]
    summary, _ = attacked_run(tmp_path, overrides, message_type, attack)
    if "failed_turns" in summary:  # split protocols: the attacker's turns count as failed, the other site's do not
        assert [(f["round"], f["node"]) for f in summary["failed_turns"]] == [(1, ATTACKER), (2, ATTACKER)]
        assert all(f["reason"].startswith("refused reply: ") and reason in f["reason"] for f in summary["failed_turns"])
    else:
        refused = [r for r in summary["rejections"] if r["phase"] == "autoencoder"]
        assert refused and all(r["node"] == ATTACKER and reason in r["reason"] for r in refused)
        assert summary["rejected_autoencoder_replies"] == len(refused)


def test_a_malformed_evaluation_reply_is_left_out_of_the_pooled_accuracy(tmp_path):
    """A NaN count in a site's evaluation reply stopped the server; now that site's scores are left out."""
    summary, rows = attacked_run(tmp_path, [*SPLIT, "eval.where=site"], "evaluate.split", metric("count", float("nan")))
    assert summary["failed_turns"] == [] and len(rows) == 2
    assert all(row["accuracy"] is not None and row["eval_clients"] == [1] for row in rows)  # the honest site's scores only


FEDAVG = ["protocol=fedavg", "model=small_cnn", "train.local_steps=2"]
FEDAVG_ATTACKS = {
    "data that is not its declared shape": (OTHER_SHAPE, "declared"),
    "bytes that are not an array": (GARBAGE, "cannot be read as an array"),
    "bytes numpy would open as a zip archive": (ZIP, "cannot be read as an array"),
    "a privacy record without its history": (lambda content: content.__setitem__("privacy", ConfigRecord({"other": "x"})), "without a text 'history'"),
}


@pytest.mark.parametrize("name", list(FEDAVG_ATTACKS))
def test_fedavg_refuses_a_malformed_update_and_averages_the_others(tmp_path, name):
    """Labels that do not match the bytes, bytes that are no array, a privacy record without its history: each stopped
    the server (Flower's average could not broadcast, numpy could not parse, a KeyError)."""
    attack, reason = FEDAVG_ATTACKS[name]
    _, rows = attacked_run(tmp_path, FEDAVG, "train.fedavg", attack, num_clients=3)
    assert len(rows) == 2 and all(row["rejected"] == 1 and reason in row["rejected_reasons"][0] for row in rows)


@pytest.mark.parametrize("change", ["an extra metric", "a metric left out"])
def test_fedavg_takes_an_update_whose_metric_keys_differ_from_the_others(tmp_path, change):
    """Flower's consistency check ended the run when one reply's metric keys differed; the average now takes the metrics
    every reply has (the update itself is checked as before)."""
    attack = metric("extra", 1.0) if change == "an extra metric" else (lambda content: content["metrics"].__delitem__("train_loss"))
    _, rows = attacked_run(tmp_path, FEDAVG, "train.fedavg", attack, num_clients=3)
    assert len(rows) == 2 and all(row["rejected"] == 0 and row["accuracy"] is not None for row in rows)


@pytest.mark.parametrize("protocol", ["fedavg", "dssgd"])
@pytest.mark.parametrize("attack", ["NaN count", "no metrics"])
def test_a_malformed_site_evaluation_is_left_out_with_its_reason(tmp_path, protocol, attack):
    """eval.where=site: a NaN num-examples or a missing metrics record in an evaluation reply stopped the server."""
    change = metric("num-examples", float("nan")) if attack == "NaN count" else drop("metrics")
    overrides = FEDAVG if protocol == "fedavg" else ["protocol=dssgd", "train.local_steps=2"]
    _, rows = attacked_run(tmp_path, [*overrides, "eval.where=site"], f"evaluate.{protocol}", change, num_clients=3)
    assert len(rows) == 2
    for row in rows:
        assert row["eval_clients"] == [1, 2] and row["accuracy"] is not None
        assert any(failure.startswith(f"node {ATTACKER}: ") for failure in row["eval_failures"])


def test_dssgd_records_a_list_where_a_number_belongs_without_stopping(tmp_path):
    _, rows = attacked_run(tmp_path, ["protocol=dssgd", "train.local_steps=2"], "train.dssgd", metric("client_flops", [1.0, 2.0]))
    assert len(rows) == 2 and all(row["client_flops"] > 0 for row in rows)


@pytest.mark.parametrize("overrides, message_type, key", [(SPLIT, "train.split", "train_loss"), (FEATURES, "train.features", "ae_loss")])
def test_an_honest_sites_nan_loss_is_recorded_not_refused(tmp_path, overrides, message_type, key):
    """A diverged training reports a NaN loss; that is a figure, not an attack: the turn or reply stands."""
    summary, _ = attacked_run(tmp_path, overrides, message_type, metric(key, float("nan")))
    assert summary.get("failed_turns", []) == [] and summary.get("rejections", []) == []


def test_dssgd_refuses_an_upload_of_empty_bytes(tmp_path):
    """Empty bytes made numpy raise EOFError, which stopped the server."""
    summary, rows = attacked_run(tmp_path, ["protocol=dssgd", "train.local_steps=2"], "train.dssgd", EMPTY)
    assert len(rows) == 2 and summary["rejected_uploads"] == 2
    assert all(r["node"] == ATTACKER and "cannot be read as an array" in r["reason"] for row in rows for r in row["rejected"])


def test_features_refuses_an_upload_of_empty_bytes(tmp_path):
    """A features upload chunk of empty bytes (EOFError) stopped the server; now the chunk is refused."""
    def empty_upload(content):
        if "arrays" in content.array_records:  # the upload replies (the autoencoder replies carry metrics only)
            EMPTY(content)

    summary, _ = attacked_run(tmp_path, FEATURES, "train.features", empty_upload)
    uploads = [r for r in summary["rejections"] if r["phase"] == "upload"]
    assert uploads and all(r["node"] == ATTACKER and "cannot be read as an array" in r["reason"] for r in uploads)


def test_the_normalize_phase_leaves_out_a_site_claiming_infinitely_many_pixels(tmp_path):
    """An infinite count (int(inf): OverflowError) stopped the server; now that site is the phase's failure."""
    summary, rows = attacked_run(tmp_path, [*FEDAVG, "dataset.normalization=federated"], "query.normalize", metric("count", float("inf")))
    assert len(rows) == 2 and summary["phases"]["normalize"]["sites"] == 1
    assert any(f"node {ATTACKER}" in failure for failure in summary["phases"]["normalize"]["failures"])


def test_fedavg_trains_a_model_with_integer_buffers_past_round_one(tmp_path):
    """Flower's average turned BatchNorm's int64 num_batches_tracked into float64, so every round-2 reply (int64 again)
    was refused as another dtype and the run stopped; the average now keeps the model's dtypes."""
    _, rows = attacked_run(tmp_path, ["protocol=fedavg", "model=resnet18", "train.local_steps=1"], "none", lambda content: None)
    assert len(rows) == 2 and all(row["rejected"] == 0 for row in rows)
