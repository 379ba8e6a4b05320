"""A malicious site attacks FedAvg's average: its reply is refused, counted and logged, and the model is untouched."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from graftfl.config import ConfigError, compose_config, validate
from graftfl.server_app.app import run_protocol
from graftfl.strategies.checkpoint import load_checkpoint
from graftfl.strategies.fedavg import FedAvgWithMetrics
from graftfl.strategies.replies import reply_problem
from graftfl.strategies.utils import ServerRun
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid

BASE = ["protocol=fedavg", "dataset=digits", "model=small_cnn", "num_clients=3", "rounds=2", "train.local_steps=2", "progress=false"]
ATTACKER = 100  # node 100 holds partition 0


def scaled(value: float):
    """Every weight of the reply replaced by ``value`` (1e30, NaN)."""
    def attack(arrays: dict, metrics: dict):
        return {key: np.full_like(array, value) for key, array in arrays.items()}, metrics
    return attack


def wrong_shape(arrays: dict, metrics: dict):
    key = next(iter(arrays))
    return {**arrays, key: np.zeros((*arrays[key].shape, 2), dtype=arrays[key].dtype)}, metrics


def missing_key(arrays: dict, metrics: dict):
    return dict(list(arrays.items())[1:]), metrics


def wrong_dtype(arrays: dict, metrics: dict):
    key = next(iter(arrays))
    return {**arrays, key: arrays[key].astype(np.float64)}, metrics


def huge_count(arrays: dict, metrics: dict):
    return arrays, {**metrics, "num-examples": 10**12}


def zero_count(arrays: dict, metrics: dict):
    return arrays, {**metrics, "num-examples": 0}


def fractional_count(arrays: dict, metrics: dict):
    return arrays, {**metrics, "num-examples": 2.5}


def metric(key: str, value):
    """One metric of the reply replaced by ``value``."""
    def attack(arrays: dict, metrics: dict):
        return arrays, {**metrics, key: value}
    return attack


ATTACKS = {
    "1e30": (scaled(1e30), [], "exceeds"),  # 1e30 is finite: only the norm bound catches it
    "nan": (scaled(float("nan")), [], "non-finite"),
    "inf": (scaled(float("inf")), [], "non-finite"),
    "wrong-shape": (wrong_shape, [], "expected float32"),
    "wrong-dtype": (wrong_dtype, [], "float64"),
    "missing-key": (missing_key, [], "missing"),
    "huge-count": (huge_count, ["protocol.max_examples_per_site=5000"], "exceeds protocol.max_examples_per_site=5000"),
    "zero-count": (zero_count, [], "positive integer"),
    "fractional-count": (fractional_count, [], "positive integer"),
    # a NaN partition id stopped the server (int(nan) in its bookkeeping), a NaN metric poisoned the averaged metrics
    "nan-partition-id": (metric("partition-id", float("nan")), [], "partition-id must be whole numbers >= 0, got [nan]"),
    "negative-partition-id": (metric("partition-id", -3), [], "partition-id must be whole numbers >= 0"),
    "listed-loss": (metric("train_loss", [1.0, 2.0]), [], "are lists, not numbers"),
}


def tampering(attack, node: int = ATTACKER):
    """FakeGrid ``tamper=``: the attacker's honest reply rewritten by ``attack(arrays, metrics)``."""
    def tamper(reply_node: int, reply: Message) -> Message:
        if reply_node != node or reply.has_error():
            return reply
        arrays = {key: array.numpy() for key, array in reply.content["arrays"].items()}
        arrays, metrics = attack(arrays, dict(reply.content["metrics"]))
        content = RecordDict({"arrays": ArrayRecord({key: Array(value) for key, value in arrays.items()}), "metrics": MetricRecord(metrics)})
        return Message(content, metadata=reply.metadata)
    return tamper


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def honest_without_attacker(tmp_path_factory):
    """The model two honest sites reach when the attacker's replies are errors (what a refused reply must amount to)."""
    faults = {(round_, ATTACKER): (lambda message, context: Message(Error(code=0, reason="down"), reply_to=message)) for round_ in (1, 2)}
    cfg = compose_config([*BASE, f"output_dir={tmp_path_factory.mktemp('reference')}", "run_id=reference", "protocol.max_update_norm=1e6"])
    with flower_task_identity():
        run_dir = run_protocol(FakeGrid(3, faults=faults), cfg)
    return load_checkpoint(run_dir)["model"]


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_malicious_sites_reply_is_refused_counted_and_leaves_the_model_as_the_honest_sites_made_it(name, tmp_path, honest_without_attacker, caplog):
    attack, overrides, reason = ATTACKS[name]
    cfg = compose_config([*BASE, f"output_dir={tmp_path}", f"run_id=attack-{name}", "protocol.max_update_norm=1e6", *overrides])
    grid = FakeGrid(3, tamper=tampering(attack))
    with flower_task_identity(), caplog.at_level(logging.WARNING, logger="graftfl.strategies.fedavg"):
        run_dir = run_protocol(grid, cfg)
    logged = rows(run_dir)
    assert [row["rejected"] for row in logged] == [1, 1]  # the run went on, the attacker refused each round
    assert all(reason in row["rejected_reasons"][0] and row["rejected_reasons"][0].startswith(f"node {ATTACKER}:") for row in logged)
    assert all(row["clients"] == [1, 2] for row in logged)  # the average holds the honest sites only
    assert f"node {ATTACKER}" in caplog.text and "refused" in caplog.text
    model = load_checkpoint(run_dir)["model"]
    for key, expected in honest_without_attacker.items():
        assert torch.isfinite(model[key].float()).all()
        torch.testing.assert_close(model[key], expected, rtol=1e-5, atol=1e-6)
    refused_bytes = sum(row["bytes_up"] for row in logged) - sum(sum(row["client_bytes_up"]) for row in logged)
    assert refused_bytes > 0  # the refused replies' traffic is still counted


def test_without_bounds_a_huge_count_is_trusted_as_documented(tmp_path):
    """Negative control: ``max_examples_per_site=null`` (the default) trusts the count, so the attacker dominates."""
    cfg = compose_config([*BASE, f"output_dir={tmp_path}", "run_id=trusting", "rounds=1"])
    with flower_task_identity():
        run_dir = run_protocol(FakeGrid(3, tamper=tampering(huge_count)), cfg)
    assert rows(run_dir)[0]["rejected"] == 0


def reply(node: int, arrays: dict, count=10) -> Message:
    import time

    from flwr.common import Metadata

    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="", group_id="1",
                        created_at=time.time(), ttl=60.0, message_type="train.fedavg")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"partition-id": node, "num-examples": count})})
    return Message(content, metadata=metadata)


@pytest.fixture
def strategy(tmp_path):
    run = ServerRun(compose_config(["dataset=digits", "protocol.max_examples_per_site=100", "protocol.max_update_norm=10"]), tmp_path / "run")
    fedavg = FedAvgWithMetrics(run, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    fedavg.sent = 3
    fedavg.reference = {"w": np.zeros(3, dtype=np.float32)}
    return fedavg


def test_the_average_is_exactly_the_honest_replies(strategy):
    arrays, _ = strategy.aggregate_train(1, [reply(1, {"w": np.full(3, 1.0, np.float32)}), reply(2, {"w": np.full(3, 1e30, np.float32)}),
                                             reply(3, {"w": np.full(3, 3.0, np.float32)}, count=30)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, (1 * 10 + 3 * 30) / 40))  # weighted by the honest counts only
    assert len(strategy.rejected) == 1 and "max_update_norm" in strategy.rejected[0] and strategy.rejected[0].startswith("node 2:")


def test_an_update_beyond_the_norm_bound_is_refused_and_one_within_accepted(strategy):
    assert reply_problem(reply(1, {"w": np.full(3, 5.0, np.float32)}).content, strategy.reference, None, 10.0) is None  # norm 8.66
    assert "max_update_norm" in reply_problem(reply(1, {"w": np.full(3, 6.0, np.float32)}).content, strategy.reference, None, 10.0)  # 10.4


def test_a_round_in_which_every_reply_is_refused_stops_the_run_with_the_reasons(strategy):
    with pytest.raises(RuntimeError, match="no client finished training.*non-finite.*num-examples=1000 exceeds"):
        strategy.aggregate_train(1, [reply(1, {"w": np.full(3, np.nan, np.float32)}), reply(2, {"w": np.zeros(3, np.float32)}, count=1000)])


def test_extra_records_are_refused_instead_of_crashing_flowers_consistency_check(strategy):
    bad = reply(1, {"w": np.zeros(3, np.float32)})
    bad.content["more"] = ArrayRecord({"w": torch.zeros(3)})
    arrays, _ = strategy.aggregate_train(1, [bad, reply(2, {"w": np.ones(3, np.float32)})])
    assert "one ArrayRecord" in strategy.rejected[0] and (arrays["w"].numpy() == 1).all()


@pytest.mark.parametrize("override", ["protocol.max_examples_per_site=0", "protocol.max_update_norm=-1", "protocol.max_examples_per_site=2.5"])
def test_bad_bounds_are_config_errors(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        validate(compose_config(["protocol=fedavg", "dataset=digits", override]))


def test_the_average_does_not_depend_on_the_order_the_replies_arrived_in(strategy):
    """Flower sums in the given order; on Ray and in deployment that is the order sites finished in. A float sum
    depends on its order, so the strategy sorts by claimed partition id: a seeded run's weights no longer vary."""
    from flwr.serverapp.strategy import FedAvg

    rng = np.random.default_rng(4)
    updates = {node: rng.standard_normal(3).astype(np.float32) * 0.3 for node in (1, 2, 3, 4)}
    counts = {1: 7, 2: 13, 3: 29, 4: 31}

    def replies(order):
        return [reply(node, {"w": updates[node]}, count=counts[node]) for node in order]

    orders = [(1, 2, 3, 4), (4, 2, 3, 1), (3, 1, 4, 2)]
    plain = [FedAvg.aggregate_train(strategy, 1, replies(order))[0]["w"].numpy() for order in orders]
    assert any(not np.array_equal(plain[0], other) for other in plain[1:])  # the data is order-sensitive
    sorted_by_strategy = [strategy.aggregate_train(1, replies(order))[0]["w"].numpy() for order in orders]
    assert all(np.array_equal(sorted_by_strategy[0], other) for other in sorted_by_strategy[1:])
    assert np.array_equal(sorted_by_strategy[0], plain[0])  # partition order


def test_replies_are_put_in_claimed_partition_order_then_node_order():
    from graftfl.strategies.utils import in_partition_order

    def with_partition(node: int, partition) -> Message:
        message = reply(node, {"w": np.zeros(3, np.float32)})
        message.content["metrics"] = MetricRecord({} if partition is None else {"partition-id": partition})
        return message

    replies = [with_partition(9, 2), with_partition(5, None), with_partition(7, 0), with_partition(3, 2), with_partition(8, 1.5)]
    assert [r.metadata.src_node_id for r in in_partition_order(replies)] == [5, 8, 7, 3, 9]  # unclaimed or non-integer: -1 first
