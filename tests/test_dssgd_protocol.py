"""DSSGD server + client through Flower messages, in-process (LocalGrid): rejection, persistence, order, privacy."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from graftfl.clients import dssgd as dssgd_client
from graftfl.config import ConfigError, compose_config, to_container
from graftfl.core.codec import flatten_parameters
from graftfl.core.models import model_from_config
from graftfl.core.selective import coordinate_budget, decode_sparse, encode_sparse, sparse_nbytes
from graftfl.strategies.checkpoint import load_checkpoint
from graftfl.strategies.utils import CONFIG_KEY, ServerRun
from graftfl.strategies.wire_bytes import message_nbytes
from tests.conftest import read_metrics as rows_of
from tests.dssgd_helpers import LocalGrid, server_identity
from tests.dssgd_helpers import run_local as run_dssgd_locally

BASE = ["protocol=dssgd", "dataset=digits", "progress=false", "train.local_steps=5"]

run_local = partial(run_dssgd_locally, base=BASE)


def with_upload(reply: Message, indices: np.ndarray, values: np.ndarray) -> Message:
    reply.content["upload"] = ArrayRecord({"indices": Array(np.ascontiguousarray(indices)), "values": Array(np.ascontiguousarray(values))})
    return reply


def test_bad_uploads_are_rejected_and_logged_while_the_round_completes(tmp_path):
    """Out of range, duplicate, NaN and too-many uploads are rejected; honest uploads (only) reach the global model."""
    honest: dict[int, list] = {1: [], 2: []}

    def tamper(node: int, reply: Message) -> Message:
        server_round = grid.delivered[-1][1]  # the round of the message this reply answers
        indices, values = decode_sparse({k: a.numpy() for k, a in reply.content["upload"].items()})
        bad = {
            (101, 1): lambda: with_upload(reply, np.array([0, 10**9], np.int32), np.array([1.0, 1.0], np.float32)),
            (102, 1): lambda: with_upload(reply, np.array([4, 4], np.int32), np.array([1.0, 2.0], np.float32)),
            (101, 2): lambda: with_upload(reply, np.array([1, 2], np.int32), np.array([np.nan, 1.0], np.float32)),
            (102, 2): lambda: with_upload(reply, np.arange(budget + 1, dtype=np.int32), np.ones(budget + 1, np.float32)),
        }.get((node, server_round))
        if bad is None:
            honest[server_round].append((indices, values))
            return reply
        return bad()

    grid = LocalGrid(3, tamper=tamper)
    cfg = compose_config([*BASE, "num_clients=3"])
    initial = flatten_parameters(ServerRun(cfg, tmp_path / "probe").new_model())
    budget = coordinate_budget(0.1, initial.numel())
    run_dir = run_local(tmp_path, ["num_clients=3", "rounds=2"], grid)

    rows = rows_of(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    reasons = [[r["reason"] for r in row["rejected"]] for row in rows]
    assert any("out of range" in r for r in reasons[0]) and any("duplicate" in r for r in reasons[0])
    assert any("non-finite" in r for r in reasons[1]) and any("exceed" in r for r in reasons[1])
    assert [len(r) for r in reasons] == [2, 2]
    assert json.loads((run_dir / "summary.json").read_text())["rejected_uploads"] == 4
    expected = initial.clone()
    for indices, values in honest[1] + honest[2]:
        expected.index_add_(0, indices, values)
    state = load_checkpoint(run_dir)["model"]
    got = torch.cat([tensor.reshape(-1) for name, tensor in state.items()])
    assert len(honest[1]) == len(honest[2]) == 1
    assert torch.allclose(got, expected, atol=1e-6)


def test_a_silent_participant_is_skipped_and_the_round_completes(tmp_path):
    run_dir = run_local(tmp_path, ["num_clients=3", "rounds=1", "timeout_s=1"], LocalGrid(3, silent={102}))
    (row,) = rows_of(run_dir)
    assert row["failed"] == [{"node": 102, "reason": "no reply within timeout", "bytes_up": 0}]
    assert row["clients"] == [0, 2] and row["accuracy"] is not None


def test_round_robin_order_and_sampling_by_fraction(tmp_path):
    grid = LocalGrid(3)
    run_local(tmp_path, ["num_clients=3", "rounds=4", "protocol.order=round_robin", "protocol.fraction_train=0.3"], grid)
    assert grid.delivered == [(101, 1), (102, 2), (103, 3), (101, 4)]
    grid = LocalGrid(3)
    run_local(tmp_path, ["num_clients=3", "rounds=3", "protocol.fraction_train=0.6"], grid)
    per_round = [sorted(n for n, r in grid.delivered if r == rnd) for rnd in (1, 2, 3)]
    assert all(len(nodes) == 2 for nodes in per_round)


def _train_message(cfg, server_round: int, indices, values, num_params: int) -> Message:
    arrays = encode_sparse(indices, values, num_params)
    content = RecordDict(
        {
            "config": ConfigRecord({CONFIG_KEY: json.dumps(to_container(cfg)), "server-round": server_round}),
            "download": ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in arrays.items()}),
        }
    )
    return Message(content=content, dst_node_id=101, message_type="train.dssgd")


def test_local_model_persists_between_rounds_and_only_downloaded_values_are_replaced():
    """Unlike FedAvg, round 2 starts from the participant's own round-1 model, not the global one."""
    cfg = compose_config([*BASE, "num_clients=3", "train.local_steps=3"])
    context = Context(run_id=1, node_id=101, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={})
    with server_identity():
        torch.manual_seed(cfg.seed)
        global_params = flatten_parameters(model_from_config(cfg, (1, 8, 8), 10))
        n = global_params.numel()
        dssgd_client.train(_train_message(cfg, 1, None, global_params, n), context)  # θd = 1 in round 1
        after_round_1 = flatten_parameters(dssgd_client.local_model(cfg, context, (1, 8, 8), 10))
        assert not torch.allclose(after_round_1, global_params)  # trained locally, kept in context.state
        # round 2: download 10 % of the coordinates; the server's values there are zeros
        downloaded = torch.arange(0, n, 10)
        frozen = compose_config([*BASE, "num_clients=3", "train.local_steps=1", "train.lr=1e-12", "train.momentum=0"])
        reply = dssgd_client.train(_train_message(frozen, 2, downloaded, torch.zeros(len(downloaded)), n), context)
    after_round_2 = flatten_parameters(dssgd_client.local_model(cfg, context, (1, 8, 8), 10))
    kept = torch.ones(n, dtype=torch.bool)
    kept[downloaded] = False
    assert torch.allclose(after_round_2[kept], after_round_1[kept], atol=1e-6)  # own values survive
    assert torch.allclose(after_round_2[downloaded], torch.zeros(len(downloaded)), atol=1e-6)  # download overwrote
    assert reply.content["metrics"]["downloaded"] == len(downloaded)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_dpsgd_epsilon_is_cumulative_and_matches_one_shot_accountant(tmp_path, batch_size):
    """ε after each round (history persisted in context.state) equals Opacus's RDP accountant fed every step at once."""
    from opacus.accountants import RDPAccountant

    grid = LocalGrid(2)
    overrides = ["num_clients=2", "rounds=3", "privacy=dpsgd", "privacy.noise_multiplier=1.1", f"train.batch_size={batch_size}", "train.lr=0.01"]
    overrides += ["protocol.selection=sparse_vector", "protocol.threshold=0.001", "protocol.clip=0.05", "protocol.upload_epsilon=0.5"]
    run_dir = run_local(tmp_path, overrides, grid)
    rows = rows_of(run_dir)
    assert all(not row["rejected"] for row in rows)  # batch 1 DP-SGD gives finite uploads
    epsilons = [row["epsilon"] for row in rows]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    for context in grid.contexts.values():
        history = json.loads(context.state["privacy"]["history"])
        # Opacus merges equal (noise, sample rate) entries: 3 rounds x 5 local steps, accumulated across messages
        assert sum(int(steps) for _, _, steps in history) == 15
        one_shot = RDPAccountant()
        for noise_multiplier, sample_rate, steps in history:
            for _ in range(int(steps)):
                one_shot.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        partition = int(context.node_config["partition-id"])
        assert rows[-1]["client_epsilon"][partition] == pytest.approx(one_shot.get_epsilon(1e-5), rel=1e-9)
    assert rows[-1]["epsilon"] == max(rows[-1]["client_epsilon"])
    # private uploads (sparse vector): ε = 0.5 per upload, composed over 3 uploads
    assert [row["upload_epsilon_spent"] for row in rows] == pytest.approx([0.5, 1.0, 1.5])


def test_bytes_are_the_serialized_messages_and_the_upload_is_sparse(tmp_path):
    """bytes_up / bytes_down are the serialized Flower messages (config, metrics, metadata included)."""
    grid = LocalGrid(2)
    run_dir = run_local(tmp_path, ["num_clients=2", "rounds=1", "protocol.theta_upload=0.01"], grid)
    (row,) = rows_of(run_dir)
    assert row["bytes_down"] == sum(message_nbytes(m) for m in grid.sent)
    assert row["client_bytes_up"] == [message_nbytes(r) for r in sorted(grid.replies, key=lambda r: r.content["metrics"]["partition-id"])]
    assert row["bytes_up"] == sum(row["client_bytes_up"])
    num_params = json.loads((run_dir / "summary.json").read_text())["num_params"]
    payload = sparse_nbytes(coordinate_budget(0.01, num_params), num_params)
    config_bytes = len(grid.sent[0].content["config"][CONFIG_KEY])
    for upload in row["client_bytes_up"]:  # the sparse payload plus a small, bounded overhead
        assert payload < upload < payload + 4096
    for message in grid.sent:  # θd = 1: dense values, no indices; and the whole config, every message
        assert num_params * 4 + config_bytes < message_nbytes(message) < num_params * 4 + config_bytes + 2048


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["protocol.selection=threshold"], "threshold"),
        (["protocol.upload_epsilon=1.0"], "sparse_vector"),
        (["protocol.order=sideways"], "order"),
        (["protocol.download=everything"], "download"),
        (["protocol.theta_upload=1.5"], "theta_upload"),
    ],
)
def test_invalid_config_is_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(["protocol=dssgd", *overrides])
