"""Whole split runs: the ServerApp pipeline with Flower messages, in process and in Flower's simulation.

``InProcessGrid`` (the shared :class:`~tests.helpers.FakeGrid`) delivers each
Flower message to the real ClientApp handler of its node (with its own Context
and node config) in this process, so the turn orchestration, hand-off policies and faults are tested in seconds; the per-batch
traffic still runs over the real gRPC data plane on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
from unittest import mock

import pytest
import torch

from graftfl.config import compose_config
from graftfl.server_app.app import run_protocol
from graftfl.strategies.split_turns import AllTurnsFailed
from graftfl.transport.client import DataPlaneClient
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid

SPLIT_KEY = "11" * 32


def InProcessGrid(num_nodes: int, faults: dict | None = None) -> FakeGrid:
    """The shared in-process grid; every node holds the split key; ``faults[(round, node)]`` replaces a handler."""
    return FakeGrid(num_nodes, run_id=7, node_config={"split-key": SPLIT_KEY}, faults=faults)


@pytest.fixture(autouse=True)
def task_identity():
    with flower_task_identity(run_id=7):  # the run id of the in-process contexts
        yield


def crash_after(exchanges: int, handler):
    """A client handler whose process dies after ``exchanges`` data-plane exchanges."""

    def crashing(message, context):
        count, original = {"n": 0}, DataPlaneClient.exchange

        def exchange(self, *args, **kwargs):
            count["n"] += 1
            if count["n"] > exchanges:
                raise ConnectionError("client crashed mid-turn")
            return original(self, *args, **kwargs)

        with mock.patch.object(DataPlaneClient, "exchange", exchange):
            return handler(message, context)

    return crashing


def stall(message, context):
    """A client that sends one batch, then never answers the Flower message."""
    fields = message.content["config"]
    plane = DataPlaneClient(str(fields["data-plane-address"]), str(fields["data-plane-token"]))
    stall.plane = plane
    return None


def run_in_process(tmp_path, overrides, faults=None, num_nodes=3):
    cfg = compose_config(["dataset=digits", f"num_clients={num_nodes}", "rounds=2", "progress=false", f"output_dir={tmp_path}", "protocol.turn_batches=6", *overrides])
    grid = InProcessGrid(num_nodes, faults)
    run_dir = run_protocol(grid, cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return grid, run_dir, rows, json.loads((run_dir / "summary.json").read_text())


def test_crashed_and_stalled_turns_are_skipped_and_relay_resumes(tmp_path):
    from graftfl.clients import split as split_client

    faults = {(1, 101): crash_after(2, split_client.train), (2, 100): stall}
    grid, run_dir, rows, summary = run_in_process(tmp_path, ["protocol=split"], faults)
    failed = summary["failed_turns"]
    assert [(f["round"], f["node"]) for f in failed] == [(1, 101), (2, 100)]
    assert failed[0]["server_steps_kept"] == 2 and "crashed mid-turn" in failed[0]["reason"]
    assert failed[1]["server_steps_kept"] == 0 and "no reply" in failed[1]["reason"]
    # the top kept the crashed turn's 2 completed steps; every other turn did 6
    assert rows[-1]["server_steps"] == 6 * 4 + 2
    assert [r["failed_turns"] for r in rows] == [1, 1] and [r["clients"] for r in rows] == [[0, 2], [1, 2]]
    # relay: node 102 in round 1 got the ciphertext node 100 handed back (node 101 never handed any back)
    trains = [(m, r) for m, r in grid.log if m.metadata.message_type == "train.split"]
    handed_back = {m.metadata.dst_node_id: bytes(r.content["handoff"]["relay-ciphertext"]) for m, r in trains[:2] if not r.has_error()}
    sent_to_102 = [m for m, _ in trains if m.metadata.dst_node_id == 102][0]
    assert bytes(sent_to_102.content["handoff"]["relay-ciphertext"]) == handed_back[100]
    # the stalled client's token is dead: its late frame is refused (the plane is stopped by now: any error will do)
    with pytest.raises(Exception):  # noqa: B017
        stall.plane.exchange("train", {"activations": torch.zeros(1, 6, 4, 4), "labels": torch.zeros(1, dtype=torch.long)})
    stall.plane.abandon()
    assert rows[-1]["accuracy"] is not None and rows[-1]["loss"] < rows[0]["loss"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (run_dir / name).exists()


def test_relay_ciphertext_on_server_is_not_the_weights(tmp_path):
    grid, run_dir, rows, summary = run_in_process(tmp_path, ["protocol=split", "rounds=1"], num_nodes=2)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    stored = checkpoint["extra"]["relay-ciphertext"]
    from graftfl.core.handoff import decrypt_state, parse_key

    bottom = decrypt_state(parse_key(SPLIT_KEY), stored)["modules"]["bottom"]  # only a key holder can do this
    weights = bottom["conv1.0.weight"].numpy().tobytes()
    assert len(weights) > 64 and not any(weights[i : i + 16] in stored for i in range(0, len(weights) - 16, 4))
    assert set(checkpoint["model"]) == {k for k in checkpoint["model"] if not k.startswith("conv1.")}, "the server holds the bottom"


class ClaimsSimulationGrid(FakeGrid):
    """Keyless nodes behind a server that tells them they run in simulation (a server-known key would follow)."""

    def __init__(self, num_nodes: int):
        super().__init__(num_nodes, run_id=7)  # no split-key in the node config

    def send_and_receive(self, messages, timeout=None):
        for message in messages:
            message.content["config"]["simulated"] = True
        return super().send_and_receive(messages, timeout)


def test_keyless_client_refuses_to_relay_whatever_the_server_says(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAFTFL_SPLIT_KEY", raising=False)
    cfg = compose_config(["dataset=digits", "num_clients=2", "rounds=1", "progress=false", f"output_dir={tmp_path}", "protocol.turn_batches=3", "protocol=split"])
    grid = ClaimsSimulationGrid(2)
    with pytest.raises(AllTurnsFailed) as stopped:  # every turn of the round failed: the run stops with the reasons
        run_protocol(grid, cfg)
    failed = stopped.value.failed_turns
    assert "MissingSplitKey" in str(stopped.value) and "node 100" in str(stopped.value) and "node 101" in str(stopped.value)
    assert [f["node"] for f in failed] == [100, 101]
    for record in failed:
        assert "MissingSplitKey" in record["reason"] and "GRAFTFL_SPLIT_KEY" in record["reason"] and "split-key" in record["reason"]
        assert record["server_steps_kept"] == 0  # refused before any activation left the site
    trains = [(m, r) for m, r in grid.log if m.metadata.message_type == "train.split"]
    assert trains and all(m.content["config"]["simulated"] and r.has_error() for m, r in trains)  # no ciphertext came back


def test_sim_gives_the_clients_a_fresh_key_per_run_and_keeps_the_callers(tmp_path, monkeypatch):
    from graftfl import cli

    seen = []

    def fake_run_simulation(*args, **kwargs):
        seen.append(os.environ.get("GRAFTFL_SPLIT_KEY"))
        raise RuntimeError("stop here")

    monkeypatch.setattr("flwr.simulation.run_simulation", fake_run_simulation)
    monkeypatch.delenv("GRAFTFL_SPLIT_KEY", raising=False)
    for name, default in (("PYTHONPATH", ""), ("RAY_DEDUP_LOGS", "0")):  # simulate() sets these: restore them afterwards
        monkeypatch.setenv(name, os.environ.get(name, default))
    cfg = compose_config(["dataset=digits", "num_clients=2", "rounds=1", "progress=false", f"output_dir={tmp_path}", "protocol=split"])
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stop here"):
            cli.simulate(cfg)
        assert "GRAFTFL_SPLIT_KEY" not in os.environ  # the run's key does not outlive the run
    assert len(seen) == 2 and seen[0] != seen[1] and all(len(bytes.fromhex(k)) == 32 for k in seen)
    monkeypatch.setenv("GRAFTFL_SPLIT_KEY", "33" * 32)
    with pytest.raises(RuntimeError, match="stop here"):
        cli.simulate(cfg)
    assert seen[-1] == "33" * 32 and os.environ["GRAFTFL_SPLIT_KEY"] == "33" * 32


@pytest.mark.parametrize(
    "overrides",
    [
        ["protocol=split", "protocol.handoff=local", "protocol.turn_order=random"],
        ["protocol=split", "protocol.handoff=average", "protocol.wire_dtype=bfloat16"],
        ["protocol=split", "protocol.handoff=average", "eval.where=server"],
        ["protocol=ushaped", "protocol.handoff=relay"],
        ["protocol=ushaped", "protocol.handoff=local"],
        ["protocol=semisup", "protocol.handoff=average", "protocol.unlabeled_fraction=0.5"],
        ["protocol=split", "model=mlp"],  # the MLP's first stage only flattens: the default cut is its first layer
    ],
    ids=lambda o: "-".join(v.split("=")[1] for v in o),
)
def test_protocol_variants_run(tmp_path, overrides):
    grid, run_dir, rows, summary = run_in_process(tmp_path, [*overrides, "protocol.turn_batches=15"])
    assert summary["failed_turns"] == [] and len(rows) == 2
    assert summary["cut_stage"] == ("fc1" if "model=mlp" in overrides else "conv1")
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["client_flops"] > 0 for r in rows)
    assert rows[-1]["accuracy"] > 0.2, rows[-1]
    evaluated = len(rows[-1]["eval_clients"])
    # eval.where=site (default): every site scores its own held-out rows; server: its test set through one client (each with local)
    on_server = "eval.where=server" in overrides
    assert evaluated == (1 if on_server and "protocol.handoff=local" not in overrides else 3)
    assert all(count > 0 for count in rows[-1]["eval_client_count"]) and rows[-1]["eval_where"] == ("server" if on_server else "site")


# Split in Flower's simulation runtime (Ray): tests/test_site_sim_deploy.py runs it on site folders and checks
# the run directory, rounds, failed turns, accuracy, bytes and clients there (one simulation instead of two).


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["protocol=split", "protocol.handoff=nope"], "protocol.handoff must be one of"),
        (["protocol=split", "protocol.cut_stage=nope"], "unknown cut stage 'nope'"),
        (["protocol=split", "model=mlp", "protocol.cut_stage=flatten"], "cut stage 'flatten' leaves the site's bottom without parameters; cut at 'fc1'"),
        (["protocol=ushaped", "protocol.head_stages=5"], "leaves no middle"),
        (["protocol=split", "protocol.wire_dtype=int8"], "protocol.wire_dtype must be one of"),
        (["protocol=ushaped", "protocol.plane_threads=0"], "protocol.plane_threads must be a whole number >= 1"),
        (["protocol=split", "sim.backend=inprocess", "sim.client_threads=1.5"], "sim.client_threads must be a whole number >= 1"),
        (["protocol=semisup", "protocol.unlabeled_fraction=1.0"], "unlabeled_fraction must be in [0, 1)"),
        (["protocol=split", "privacy=dpsgd", "defence.nopeek=0.5"], "defence.nopeek cannot be combined with privacy=dpsgd"),
    ],
)
def test_config_errors_name_the_valid_values(overrides, message):
    from graftfl.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(["dataset=digits", *overrides])


@pytest.mark.parametrize(
    "overrides,threads",
    [
        ([], 1),  # Ray backend: a gRPC handler thread computes the stage
        (["client_resources.num_cpus=2"], 1),
        (["sim.backend=inprocess"], 1),  # client_resources.num_cpus defaults to 1
        (["sim.backend=inprocess", "client_resources.num_cpus=2"], 2),  # in memory: the site's thread and count
        (["sim.backend=inprocess", "client_resources.num_cpus=2", "sim.client_threads=3"], 3),
        (["sim.backend=inprocess", "client_resources.num_cpus=2", "sim.split_plane=grpc"], 1),
        (["client_resources.num_cpus=2", "protocol.plane_threads=2"], 2),
        (["sim.backend=inprocess", "client_resources.num_cpus=2", "protocol.plane_threads=1"], 1),
    ],
)
def test_the_stage_computes_with_a_sites_threads_in_memory_else_one(overrides, threads):
    from graftfl.strategies.split_config import stage_threads

    assert stage_threads(compose_config(["dataset=digits", "protocol=split", *overrides])) == threads
