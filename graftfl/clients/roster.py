"""The ``roster`` pre-training phase, site side: the site says which partition it is.

``query.roster``: the reply carries this site's ``partition-id`` (its node config, set by its
operator), which every training reply carries already; the server orders the sites by it
(:mod:`graftfl.strategies.roster`).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict

from graftfl.clients.utils import partition_id_of
from graftfl.protocols import ClientPhase

PHASE = "roster"


def query(message: Message, context: Context) -> Message:
    """Answer ``query.roster`` with this site's partition id."""
    partition_id, _ = partition_id_of(context)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=message)


CLIENT_PHASE = ClientPhase(name=PHASE, query=query)
