"""``phases=[roster]``: the sites in partition order whatever node ids the SuperLink drew.

In deployment a SuperLink draws random node ids, and split's turns, DSSGD's order and a DSSGD
site's download selection followed them: the same seeded run trained differently each time.
These runs give the same partitions two opposite node-id orders (the in-process grid, real
ClientApp handlers): without the roster the weights differ, with it they are identical.
"""

from __future__ import annotations

import json

import pytest
import torch

from graftfl.config import compose_config
from graftfl.server_app.app import run_protocol
from graftfl.strategies.checkpoint import load_checkpoint
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid

SPLIT_KEY = "22" * 32
RUNS = {
    "split": ["protocol=split", "protocol.turn_batches=4"],
    "dssgd": ["protocol=dssgd", "protocol.order=round_robin", "protocol.fraction_train=0.5", "protocol.theta_download=0.5",
              "train.local_steps=2"],
}


def run_with_nodes(tmp_path, nodes: list[int], overrides: list[str], tamper=None) -> tuple[dict, dict]:
    """A 2-round digits run whose partition i sits on node ``nodes[i]``: final weights and summary."""
    cfg = compose_config(["dataset=digits", f"num_clients={len(nodes)}", "rounds=2", "progress=false", f"output_dir={tmp_path}", *overrides])
    with flower_task_identity(run_id=7):
        run_dir = run_protocol(FakeGrid(nodes=nodes, run_id=7, node_config={"split-key": SPLIT_KEY}, tamper=tamper), cfg)
    return load_checkpoint(run_dir)["model"], json.loads((run_dir / "summary.json").read_text())


def same_weights(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("protocol", sorted(RUNS))
def test_with_the_roster_the_node_ids_do_not_change_what_a_seeded_run_computes(tmp_path, protocol):
    ascending, _ = run_with_nodes(tmp_path / "a", [100, 200, 300], RUNS[protocol])
    descending, _ = run_with_nodes(tmp_path / "d", [300, 200, 100], RUNS[protocol])
    assert not same_weights(ascending, descending)  # without it the order follows the node ids
    ascending, summary = run_with_nodes(tmp_path / "ra", [100, 200, 300], [*RUNS[protocol], "phases=[roster]"])
    descending, summary_d = run_with_nodes(tmp_path / "rd", [300, 200, 100], [*RUNS[protocol], "phases=[roster]"])
    assert same_weights(ascending, descending)
    assert summary["phases"]["roster"] == {"partitions": {"100": 0, "200": 1, "300": 2}, "failures": []}
    assert summary_d["phases"]["roster"]["partitions"] == {"300": 0, "200": 1, "100": 2}


def test_a_site_that_claims_a_taken_or_impossible_partition_gets_no_place(tmp_path):
    claims = {200: 0, 300: 7}  # node 200 claims partition 0 (node 100's), node 300 one that does not exist

    def lie(node, reply):
        if reply.metadata.message_type == "query.roster" and node in claims:
            reply.content["metrics"]["partition-id"] = claims[node]
        return reply

    _, summary = run_with_nodes(tmp_path, [100, 200, 300], [*RUNS["split"], "phases=[roster]"], tamper=lie)
    roster = summary["phases"]["roster"]
    assert list(roster["partitions"].items()) == [("100", 0), ("200", -1), ("300", -1)]  # the others after, in node id order
    assert any("node 200" in failure and "claimed" in failure for failure in roster["failures"])
    assert any("node 300" in failure and "not in [0, num_clients=3)" in failure for failure in roster["failures"])
    assert summary["failed_turns"] == []  # the run itself goes on
