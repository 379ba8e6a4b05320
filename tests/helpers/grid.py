"""One in-process stand-in for Flower's ``Grid``, used by every test that drives a ServerApp without Flower.

:class:`FakeGrid` delivers each message to the handler the real ClientApp would
route it to (:func:`graftfl.protocols.client_handlers`), with one ``Context``
per node whose ``state`` persists between messages, as on a SuperNode. Faults,
silent nodes, tampered replies and fully scripted replies exercise the server's
checks. Building instruction messages needs a Flower task identity: wrap the
run in :func:`tests.conftest.flower_task_identity`.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common import Metadata

from graftfl.protocols import client_handlers


class FakeGrid:
    """A Grid whose nodes are ClientApp handlers in this process.

    Parameters
    ----------
    num_nodes : int
        Node ``first_node_id + i`` holds partition ``i`` of ``num_nodes``.
    first_node_id : int
        The first node id (Flower's ids are arbitrary integers).
    nodes : list of int, optional
        Explicit node ids instead of ``num_nodes`` consecutive ones.
    run_id : int
        The run id of every node's Context.
    node_config : dict, optional
        Extra node-config entries for every node (e.g. ``split-key``).
    faults : dict, optional
        ``{(server round, node): handler}`` replaces the handler of that node's ``train.*`` message.
    tamper : callable, optional
        ``tamper(node, reply) -> reply`` applied to every reply.
    silent : set of int, optional
        Nodes that never reply (a timeout for the server).
    respond : callable, optional
        ``respond(message) -> RecordDict``: scripted replies instead of the ClientApp handlers.
    reply_order : callable, optional
        Sort key for the replies of one ``send_and_receive`` (e.g. bad sites' replies first).
    """

    def __init__(
        self,
        num_nodes: int = 0,
        *,
        first_node_id: int = 100,
        nodes: list[int] | None = None,
        run_id: int = 1,
        node_config: dict | None = None,
        faults: dict | None = None,
        tamper: Callable[[int, Message], Message] | None = None,
        silent: set[int] | None = None,
        respond: Callable[[Message], RecordDict] | None = None,
        reply_order: Callable[[Message], object] | None = None,
    ):
        self.nodes = list(nodes) if nodes is not None else [first_node_id + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": len(self.nodes), **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for i, node in enumerate(self.nodes)
        }
        self.run_id = run_id
        self.faults, self.tamper, self.silent = faults or {}, tamper, set(silent or ())
        self.respond, self.reply_order = respond, reply_order
        self.sent: list[Message] = []  # every message the server sent
        self.delivered: list[tuple[int, int]] = []  # (node, server round) of every message with a round
        self.log: list[tuple[Message, Message]] = []  # (message, reply) pairs
        self.replies: list[Message] = []  # every reply the server got back (after tampering)
        self._message_ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def handler_for(self, message: Message) -> Callable[[Message, Context], Message | None]:
        """The ClientApp's handler for ``message`` (or this grid's fault for it)."""
        category = message.metadata.message_type.split(".")[0]
        server_round = message.content["config"].get("server-round") if "config" in message.content else None
        fault = self.faults.get((int(server_round), message.metadata.dst_node_id)) if category == "train" and server_round is not None else None
        if fault is not None:
            return fault
        handlers = client_handlers()
        if message.metadata.message_type not in handlers:
            raise KeyError(f"no ClientApp handler for '{message.metadata.message_type}'; registered: {sorted(handlers)}")
        return handlers[message.metadata.message_type]

    def _scripted_reply(self, message: Message) -> Message:
        """A reply with the metadata a SuperNode would give it (distinct message ids)."""
        node = message.metadata.dst_node_id
        metadata = Metadata(run_id=self.run_id, message_id=f"msg-{next(self._message_ids)}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                            group_id="", created_at=time.time(), ttl=60.0, message_type=message.metadata.message_type)
        return Message(self.respond(message), metadata=metadata)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if "config" in message.content and "server-round" in message.content["config"]:
                self.delivered.append((node, int(message.content["config"]["server-round"])))
            if node in self.silent:
                continue
            if self.respond is not None:
                reply = self._scripted_reply(message)
            else:
                try:
                    reply = self.handler_for(message)(message, self.contexts[node])
                except Exception as err:  # what Flower does with a raising ClientApp
                    reply = Message(Error(code=0, reason=repr(err)), reply_to=message)
            if reply is None:  # a stalled client
                continue
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            replies.append(reply)
            self.replies.append(reply)
            self.log.append((message, reply))
        return sorted(replies, key=self.reply_order) if self.reply_order else replies
