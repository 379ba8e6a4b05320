"""Bytes have one definition: the serialized Flower messages, both directions, config included."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import push_objects

from graftfl.config import compose_config
from graftfl.strategies.fedavg import FedAvgWithMetrics, round_row
from graftfl.strategies.utils import ServerRun
from graftfl.strategies.wire_bytes import message_nbytes, messages_nbytes
from tests.conftest import flower_task_identity
from tests.test_fedavg_failures import failed_reply, reply_metadata


def pushed_by_flower(message: Message) -> int:
    """What Flower's own object push hands to the transport for ``message`` (every object's bytes)."""
    pushed: list[int] = []
    push_objects(get_all_nested_objects(message), push_object_fn=lambda object_id, content: pushed.append(len(content)), max_concurrent_pushes=1)
    return sum(pushed)


def a_message(config_text: str = "x") -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.arange(1000, dtype=np.float32)), "b": Array(np.ones(10, np.float32))}),
        "config": ConfigRecord({"graftfl-config": config_text, "server-round": 3}),
        "metrics": MetricRecord({"loss": 0.5}),
    })
    with flower_task_identity():
        return Message(content=content, dst_node_id=7, message_type="train.fedavg")


def test_message_nbytes_is_what_flower_pushes_and_counts_the_config():
    message = a_message()
    assert message_nbytes(message) == pushed_by_flower(a_message())
    assert message_nbytes(message) > 4040 + message_nbytes(RecordDict({"metrics": MetricRecord({"loss": 0.5})}))  # payload is inside
    assert message_nbytes(a_message("x" * 5001)) - message_nbytes(message) >= 5000  # config is counted
    assert message_nbytes(message.content) < message_nbytes(message)  # the message adds its metadata


def test_messages_sharing_a_content_count_as_flower_pushes_each_of_them():
    from flwr.app.error import Error

    shared = a_message().content
    with flower_task_identity():
        messages = [Message(content=shared, dst_node_id=node, message_type="train.fedavg") for node in (7, 8, 9)]
        messages += [a_message("y" * 300), Message(error=Error(code=0, reason="failed"), reply_to=a_message())]
    assert messages_nbytes(messages) == sum(pushed_by_flower(message) for message in messages)
    assert messages_nbytes(messages) == sum(message_nbytes(message) for message in messages)
    shared["config"]["server-round"] = 4  # a content changed between two calls is walked again
    assert messages_nbytes(messages[:3]) == sum(pushed_by_flower(message) for message in messages[:3])



def test_message_nbytes_stays_exact_for_arrays_of_many_chunks_and_repeated_chunks():
    """Chunk sizes are computed, not deflated: still what Flower pushes, with identical chunks pushed once."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as CHUNK

    rng = np.random.default_rng(0)
    floats = CHUNK // 4
    arrays = {
        "many": Array(rng.standard_normal(3 * floats + 7).astype(np.float32)),  # three whole chunks and a short one
        "zeros": Array(np.zeros(2 * floats, np.float32)),  # two identical chunks: one object
        "odd": Array(rng.integers(0, 255, 9, dtype=np.uint8)),
        "empty": Array(np.zeros(0, np.float32)),
    }
    for lengths in ([9], [99, 100], [CHUNK - 1]):  # header digits change
        arrays.update({f"b{n}": Array(rng.integers(0, 255, n, dtype=np.uint8)) for n in lengths})
        with flower_task_identity():
            message = Message(content=RecordDict({"arrays": ArrayRecord(dict(arrays))}), dst_node_id=7, message_type="train.fedavg")
        assert message_nbytes(message) == pushed_by_flower(message)


class FakeGrid:
    def get_node_ids(self):
        return [11, 12]


def test_fedavg_counts_whole_messages_both_ways(tmp_path):
    """bytes_down: every train message (config + arrays); bytes_up: every reply, error replies too."""
    run = ServerRun(compose_config(["dataset=digits"]), tmp_path / "run")
    strategy = FedAvgWithMetrics(run, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=2)
    arrays = ArrayRecord({"w": torch.ones(300)})
    with flower_task_identity():
        messages = list(strategy.configure_train(1, arrays, run.config_record(), FakeGrid()))
        assert len(messages) == 2
        assert strategy.bytes_down == sum(message_nbytes(m) for m in messages)
        assert strategy.bytes_down > 2 * (300 * 4 + len(run.config_record()["graftfl-config"]))  # not the tensors alone
        good = [Message(RecordDict({"arrays": ArrayRecord({"w": torch.ones(300)}), "metrics": MetricRecord({"partition-id": node, "num-examples": 10})}),
                        metadata=reply_metadata(node)) for node in (0, 1)]
        bad = failed_reply(2, "site data missing")
        strategy.sent = 3
        strategy.aggregate_train(1, [*good, bad])
    assert [row["bytes_up"] for row in strategy.client_rows] == [message_nbytes(r) for r in good]
    row = round_row(1, {"accuracy": 0.5, "loss": 1.0}, strategy.client_rows, strategy.bytes_down, 0.1, strategy.client_errors, strategy.failed_bytes_up)
    assert row["bytes_up"] == sum(message_nbytes(r) for r in good) + message_nbytes(bad)
    assert row["bytes_down"] == sum(message_nbytes(m) for m in messages)


def test_the_byte_count_walks_the_objects_flower_walks_without_hashing_chunks_again(monkeypatch):
    """nested_objects takes a chunk's id from its Array: the same objects and ids as Flower's walk, no chunk hashed."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as CHUNK
    from flwr.supercore.inflatable import inflatable_object

    from graftfl.strategies.wire_bytes import nested_objects

    floats = CHUNK // 4
    content = RecordDict({
        "arrays": ArrayRecord({"zeros": Array(np.zeros(2 * floats + 3, np.float32)), "same": Array(np.zeros(2 * floats + 3, np.float32)),
                               "ramp": Array(np.arange(floats + 1, dtype=np.float32))}),
        "more": ArrayRecord({"b": Array(np.ones(7, np.float32))}),
        "config": ConfigRecord({"k": "v"}), "metrics": MetricRecord({"loss": 0.5}),
    })
    with flower_task_identity():
        message = Message(content=content, dst_node_id=7, message_type="train.fedavg")
    expected = get_all_nested_objects(message)
    walked = nested_objects(message)
    assert list(walked) == list(expected)  # same ids, same post-order
    assert [type(obj) for obj in walked.values()] == [type(obj) for obj in expected.values()]
    pushed = pushed_by_flower(message)
    hashed: list[int] = []
    real = inflatable_object.get_object_id
    monkeypatch.setattr(inflatable_object, "get_object_id", lambda content: hashed.append(len(content)) or real(content))
    assert message_nbytes(message) == pushed
    assert hashed and max(hashed) < 1000  # containers and metadata only: every chunk's id was known
