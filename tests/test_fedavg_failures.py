"""FedAvg rounds with failing clients: recorded per round, and a round nobody finished stops the run."""

import time

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Metadata

from graftfl.config import compose_config
from graftfl.strategies.fedavg import FedAvgWithMetrics, round_row
from graftfl.strategies.utils import ServerRun


def reply_metadata(node: int) -> Metadata:
    """What a SuperNode's reply carries (built here: no run is under way in a unit test)."""
    return Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id=f"request-{node}",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train.fedavg")


def good_reply(node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": torch.ones(3)}), "metrics": MetricRecord({"partition-id": node, "num-examples": 10})})
    return Message(content, metadata=reply_metadata(node))


def failed_reply(node: int, reason: str) -> Message:
    return Message(error=Error(code=0, reason=reason), metadata=reply_metadata(node))


@pytest.fixture
def strategy(tmp_path):
    run = ServerRun(compose_config(["dataset=digits"]), tmp_path / "run")
    fedavg = FedAvgWithMetrics(run, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    fedavg.sent = 3
    fedavg.reference = {"w": torch.zeros(3).numpy()}  # what configure_train records: replies are checked against it
    return fedavg


def test_failed_and_missing_clients_are_recorded(strategy):
    arrays, _ = strategy.aggregate_train(1, [good_reply(0), failed_reply(1, "partition-id 7 is outside [0, 2)")])
    assert (arrays["w"].numpy() == 1).all()  # the round aggregates the one good reply
    assert len(strategy.client_errors) == 2
    assert "partition-id 7 is outside" in strategy.client_errors[0] and "did not reply" in strategy.client_errors[1]
    row = round_row(1, {"accuracy": 0.5, "loss": 1.0}, strategy.client_rows, 0, 0.1, strategy.client_errors)
    assert row["failed_clients"] == 2 and row["clients"] == [0]


def test_a_round_that_no_client_finished_stops_the_run(strategy):
    with pytest.raises(RuntimeError, match="no client finished training.*site data missing"):
        strategy.aggregate_train(1, [failed_reply(1, "site data missing"), failed_reply(2, "site data missing")])


def test_configure_train_routes_flowers_messages_to_the_graftfl_client_and_counts_the_downlink(strategy):
    """Flower's own sampling and payload (public configure_* hooks), sent as ``train.fedavg``."""
    from flwr.app import ConfigRecord

    from tests.conftest import flower_task_identity
    from tests.helpers import FakeGrid

    arrays = ArrayRecord({"w": torch.ones(5)})
    with flower_task_identity():
        messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), FakeGrid(3)))
        evaluations = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(3)))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101, 102]
    assert {m.metadata.message_type for m in messages} == {"train.fedavg"}
    assert float(messages[0].content["config"]["lr"]) == 0.1 and int(messages[0].content["config"]["server-round"]) == 1
    from graftfl.strategies.wire_bytes import message_nbytes

    # the whole serialized messages: three copies of the model plus config and metadata
    assert strategy.sent == 3 and strategy.bytes_down == sum(message_nbytes(m) for m in messages) > 3 * 5 * 4
    assert evaluations == []  # fraction_evaluate=0: the server evaluates the global model itself
