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
    "split, NaN partition id": (SPLIT, "train.split", metric("partition-id", float("nan")), "metric 'partition-id' is nan"),
    "split, infinite samples": (SPLIT, "train.split", metric("samples", float("inf")), "metric 'samples' is inf"),
    "split, negative steps": (SPLIT, "train.split", metric("steps", -1), "steps must be whole numbers >= 0"),
    "split, no hand-off": (SPLIT, "train.split", drop("handoff"), "no relay ciphertext"),
    "split, hand-off not bytes": (SPLIT, "train.split", relay_text, "no relay ciphertext"),
    "ushaped, no metrics record": (["protocol=ushaped", "protocol.handoff=local", "protocol.turn_batches=2"], "train.ushaped", drop("metrics"),
                                   "no MetricRecord 'metrics'"),
    "average, parts of another shape": (AVERAGE, "train.split", parts(lambda first, a: np.zeros((3, 3), a.dtype) if first else a), "expected float32"),
    "average, NaN parts": (AVERAGE, "train.split", parts(lambda first, a: np.full_like(a, np.nan) if a.dtype.kind == "f" else a), "non-finite"),
    "average, a huge sample count": (AVERAGE, "train.split", metric("samples", 1e18), "exceed the turn's 2 batches"),
    "features, no metrics record": (FEATURES, "train.features", drop("metrics"), "no MetricRecord 'metrics'"),
    "features, NaN partition id": (FEATURES, "train.features", metric("partition-id", float("nan")), "metric 'partition-id' is nan"),
    "features, NaN federated autoencoder": (FEDERATED_AE, "train.features", parts(lambda first, a: np.full_like(a, np.nan) if a.dtype.kind == "f" else a),
                                            "non-finite"),
}


def attacked_run(tmp_path, overrides: list[str], message_type: str, attack) -> dict:
    def tamper(node: int, reply: Message) -> Message:
        if node == ATTACKER and reply.metadata.message_type == message_type and not reply.has_error():
            attack(reply.content)
        return reply

    cfg = compose_config(["dataset=digits", "num_clients=2", "rounds=2", "progress=false", f"output_dir={tmp_path}", *overrides])
    with flower_task_identity(run_id=7):
        run_dir = run_protocol(FakeGrid(2, run_id=7, node_config={"split-key": "44" * 32}, tamper=tamper), cfg)
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_malformed_reply_is_refused_with_its_reason_and_the_run_goes_on(tmp_path, name):
    overrides, message_type, attack, reason = ATTACKS[name]
    summary = attacked_run(tmp_path, overrides, message_type, attack)
    if "failed_turns" in summary:  # split protocols: the attacker's turns count as failed, the other site's do not
        assert [(f["round"], f["node"]) for f in summary["failed_turns"]] == [(1, ATTACKER), (2, ATTACKER)]
        assert all(f["reason"].startswith("refused reply: ") and reason in f["reason"] for f in summary["failed_turns"])
    else:
        refused = [r for r in summary["rejections"] if r["phase"] == "autoencoder"]
        assert refused and all(r["node"] == ATTACKER and reason in r["reason"] for r in refused)
        assert summary["rejected_autoencoder_replies"] == len(refused)


def test_a_malformed_evaluation_reply_is_left_out_of_the_pooled_accuracy(tmp_path):
    """A NaN count in a site's evaluation reply stopped the server; now that site's scores are left out."""
    summary = attacked_run(tmp_path, [*SPLIT, "eval.where=site"], "evaluate.split", metric("count", float("nan")))
    rows = [json.loads(line) for line in (tmp_path / summary["run_id"] / "metrics.jsonl").read_text().splitlines()]
    assert summary["failed_turns"] == [] and len(rows) == 2
    assert all(row["accuracy"] is not None and row["eval_clients"] == [1] for row in rows)  # the honest site's scores only
