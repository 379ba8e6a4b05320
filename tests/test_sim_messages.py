"""The in-process grid's copies keep the ids Flower computed for an array, and only while the array is unchanged."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from graftfl.sim.messages import copy_array, copy_records, hash_arrays
from tests.conftest import flower_task_identity


def fresh_id(array: Array) -> str:
    """The id of an equal array that nothing has hashed yet."""
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=bytes(array.data)).object_id


def test_a_copy_keeps_a_computed_id_and_its_chunks():
    array = Array(np.arange(5, dtype=np.float32))
    assert "_object_id" not in copy_array(array).__dict__  # nothing computed yet: nothing to keep
    object_id = array.object_id
    copied = copy_array(array)
    assert copied.__dict__["_object_id"] == object_id == copied.object_id == fresh_id(copied)
    assert [chunk_id for chunk_id, _ in copied.slice_array()] == [chunk_id for chunk_id, _ in array.slice_array()]
    assert copied.data is array.data and copied is not array


def test_a_changed_copy_is_hashed_again_and_the_original_keeps_its_id():
    array = Array(np.arange(5, dtype=np.float32))
    object_id = array.object_id
    copied = copy_array(array)
    copied.data = Array(np.ones(5, dtype=np.float32)).data  # Flower drops the kept id and chunks of a changed array
    assert copied.object_id == fresh_id(copied) != object_id
    assert array.object_id == object_id == fresh_id(array)


def test_copied_records_keep_the_ids_of_their_arrays_and_share_no_container():
    records = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(4, dtype=np.float32)), "b": Array(np.zeros(2, np.float32))}),
                          "config": ConfigRecord({"k": "v"})})
    with flower_task_identity():
        hash_arrays(Message(records, dst_node_id=7, message_type="train.x"))
    copied = copy_records(records)
    assert copied["arrays"] is not records["arrays"] and copied["config"] is not records["config"]
    for key, array in records["arrays"].items():
        assert copied["arrays"][key] is not array
        assert copied["arrays"][key].__dict__["_object_id"] == array.object_id == fresh_id(array)
    assert copied.object_id == records.object_id


def test_a_reply_reaches_the_server_with_its_array_ids_computed_beside_the_client():
    """The grid hashes a reply's arrays where the client ran, as a SuperNode's push does; the ids are those of the bytes."""
    from tests.test_sim_fastpath import counting_app, serving

    for workers in (1, 2):
        with serving(counting_app(), 2, client_workers=workers) as grid:
            node = list(grid.get_node_ids())[0]
            sent = Message(RecordDict({"config": ConfigRecord({"value": "x"}), "arrays": ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})}),
                           dst_node_id=node, message_type="train.mutate")
            (reply,) = grid.send_and_receive([sent], timeout=30)
            array = reply.content["arrays"]["w"]
            assert array.__dict__.get("_object_id") == fresh_id(array) and not array.is_dirty
            assert np.array_equal(array.numpy(), np.full(3, 7.0, dtype=np.float32))
