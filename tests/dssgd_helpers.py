"""In-process stand-ins for Flower's grid, used by the DSSGD tests.

``LocalGrid`` delivers each message to the real client handler with a per-node
``Context`` (so ``context.state`` persists between rounds, as on a SuperNode)
and can drop or tamper with replies to exercise the server's checks.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import Context, Message, RecordDict

from graftfl.clients import dssgd as dssgd_client
from tests.conftest import flower_task_identity

server_identity = flower_task_identity  # messages built outside Flower's runtimes need a task


class LocalGrid:
    """Runs ``graftfl.clients.dssgd.train`` in-process for ``num_nodes`` nodes.

    Parameters
    ----------
    num_nodes : int
        Node ids are 101, 102, ...; node ``101 + i`` holds partition ``i``.
    tamper : callable, optional
        ``tamper(node, reply) -> reply`` applied to every reply (bad uploads).
    silent : set of int, optional
        Nodes that never reply (a timeout for the server).
    """

    def __init__(self, num_nodes: int, tamper: Callable[[int, Message], Message] | None = None, silent: set[int] | None = None):
        self.contexts = {
            101 + i: Context(run_id=1, node_id=101 + i, node_config={"partition-id": i, "num-partitions": num_nodes}, state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.tamper = tamper
        self.silent = silent or set()
        self.delivered: list[tuple[int, int]] = []  # (node, server round)
        self.sent: list[Message] = []  # every message the server sent, and every reply it got back
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.delivered.append((node, int(message.content["config"]["server-round"])))
            self.sent.append(message)
            if node in self.silent:
                continue
            reply = dssgd_client.train(message, self.contexts[node])
            replies.append(self.tamper(node, reply) if self.tamper else reply)
        self.replies += replies
        return replies
