"""Flower's message rules for the in-process grid: checks, copies and error replies.

The in-process grid hands a message to a ClientApp in the same process, so it does
by hand what Flower's simulation gets from moving messages between processes: the
client receives a copy (it cannot change the server's records, nor the server the
client's), a reply is checked as Flower's link state checks it, and an exception in a
handler becomes an error reply, never a crash of the run.

A copy never serializes: an :class:`flwr.app.Array` holds its values as immutable
``bytes``, so a copied ArrayRecord has new containers that share those bytes.
"""

from __future__ import annotations

import copy
import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import MESSAGE_TTL_TOLERANCE, SUPERLINK_NODE_ID, ErrorCode
from flwr.server.utils import validate_message
from flwr.supercore.date import now

log = logging.getLogger(__name__)


def copy_array(array: Array) -> Array:
    """A new :class:`~flwr.app.Array` with the same dtype, shape, storage type and (immutable) bytes.

    An id Flower has computed for ``array`` (the SHA-256 of its deflated bytes) and its cut chunks
    go with the copy: they follow from those four, which the copy shares. Setting any of them on
    either array drops that array's id and chunks (Flower's ``Array.__setattr__``), so a changed
    array is hashed again.
    """
    copied = Array(dtype=array.dtype, shape=tuple(int(size) for size in array.shape), stype=array.stype, data=bytes(array.data))
    computed = array.__dict__
    if "_object_id" in computed and "_chunks" in computed and not array.is_dirty:
        copied.__dict__.update(_object_id=computed["_object_id"], _chunks=list(computed["_chunks"]), _is_dirty=False)
    return copied


def hash_arrays(message: Message) -> None:
    """Compute the ids of ``message``'s arrays and their chunks now (kept on the arrays and their copies).

    In a deployment the SuperNode hashes a reply's objects when it pushes them, in the client's own
    process. The in-process grid does it in the thread that served the client, beside other clients,
    instead of in the ServerApp's thread when it counts the reply's bytes.
    """
    if message.has_content():
        for record in message.content.array_records.values():
            for array in record.values():
                array.object_id  # noqa: B018 (a property that computes and keeps the id and the chunks)


def copy_records(records: RecordDict) -> RecordDict:
    """A copy of ``records`` that shares no mutable object with it (array bytes are shared: they are immutable)."""
    copied = RecordDict()
    for name, record in records.items():
        if isinstance(record, ArrayRecord):
            copied[name] = arrays = ArrayRecord()  # filled item by item: ArrayRecord(dict) would copy each Array again
            for key, array in record.items():
                arrays[key] = copy_array(array)
        elif isinstance(record, ConfigRecord):
            copied[name] = ConfigRecord(copy.deepcopy(dict(record)))
        elif isinstance(record, MetricRecord):
            copied[name] = MetricRecord(copy.deepcopy(dict(record)))
        else:  # a record type of a later Flower: fall back on a deep copy
            copied[name] = copy.deepcopy(record)
    return copied


def copy_message(message: Message) -> Message:
    """``message`` as another process would receive it: copied metadata, copied content or error."""
    metadata = copy.copy(message.metadata)
    if message.has_error():
        return Message(metadata=metadata, error=Error(code=message.error.code, reason=message.error.reason))
    return Message(metadata=metadata, content=copy_records(message.content))


def instruction_problems(message: Message, run_id: int, node_ids) -> list[str]:
    """Why Flower's link state would refuse to store ``message`` from the ServerApp (empty: it is accepted).

    The same checks as ``InMemoryGrid._check_message`` and ``InMemoryLinkState.store_message_ins``
    (Flower logs the reason and drops the message: no reply ever comes).
    """
    metadata = message.metadata
    problems = list(validate_message(message, is_reply_message=False))
    if metadata.reply_to_message_id:
        problems.append("an instruction message must not reply to another message")
    if metadata.src_node_id != SUPERLINK_NODE_ID:
        problems.append(f"invalid source node ID {metadata.src_node_id}")
    if metadata.run_id != run_id:
        problems.append(f"invalid run ID {metadata.run_id}")
    if metadata.dst_node_id not in node_ids:
        problems.append(f"invalid destination node ID {metadata.dst_node_id}")
    return problems


def reply_problems(reply, instruction: Message) -> list[str]:
    """Why Flower's link state would refuse ``reply`` to ``instruction`` (``store_message_res``); empty when stored."""
    if not isinstance(reply, Message):
        return [f"the ClientApp returned {type(reply).__name__}, not a Message"]
    metadata, sent = reply.metadata, instruction.metadata
    problems = list(validate_message(reply, is_reply_message=True))
    if metadata.reply_to_message_id != sent.message_id:
        problems.append("the reply does not answer the message it was returned for")
    if metadata.run_id != sent.run_id:
        problems.append("`metadata.run_id` is invalid")
    if metadata.src_node_id != sent.dst_node_id:
        problems.append("the reply's source node is not the message's destination")
    if metadata.ttl and metadata.ttl - (sent.created_at + sent.ttl - metadata.created_at) > MESSAGE_TTL_TOLERANCE:
        problems.append("the reply's TTL exceeds the message's expiry")
    return problems


def error_reply(instruction: Message, err: BaseException) -> Message:
    """The error reply Flower's simulation runtime builds when a ClientApp raises (``vce_api.worker``)."""
    wrapped = err if isinstance(err, ClientAppException) else ClientAppException(str(err))
    reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=instruction)


def mark_delivered(message: Message) -> Message:
    """Set ``delivered_at`` as Flower's link state does when it hands a message out."""
    message.metadata.delivered_at = now().isoformat()
    return message
