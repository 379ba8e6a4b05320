"""A Grid that collects replies promptly: Flower's deployed Grid waits 3 s between reply pulls.

``flwr``'s deployment Grid (``GrpcGrid``/HTTP) implements ``send_and_receive`` as push, then
pull every 3 seconds until every reply arrived. A reply therefore waits up to 3 s (1.5 s
on average) at the SuperLink before the ServerApp reads it, in every round of every
protocol. :class:`PromptGrid` wraps the Grid the ServerApp receives and implements
``send_and_receive`` with Flower's own ``push_messages``/``pull_messages`` at a short
interval; what is sent and what comes back are unchanged (same messages, same replies,
same timeout rule), only the wait between pulls is shorter.
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

PULL_INTERVAL_S = 0.2  # one cheap request to the SuperLink per interval while a round waits


class PromptGrid(Grid):
    """``grid`` with ``send_and_receive`` pulling every ``interval`` seconds; everything else is ``grid``'s.

    Parameters
    ----------
    grid : Grid
        The Grid Flower gave the ServerApp.
    interval : float
        Seconds between reply pulls.
    """

    def __init__(self, grid: Grid, interval: float = PULL_INTERVAL_S):
        self.grid = grid
        self.interval = float(interval)

    def set_run(self, run) -> None:
        """Delegated to the wrapped Grid."""
        self.grid.set_run(run)

    @property
    def run(self):
        """The wrapped Grid's run."""
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Delegated to the wrapped Grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated to the wrapped Grid."""
        return self.grid.get_node_ids()

    def get_nodes(self):
        """Delegated to the wrapped Grid."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated to the wrapped Grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated to the wrapped Grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull replies every ``interval`` s until all arrived or ``timeout`` s passed (Flower's rule)."""
        pending = set(self.push_messages(messages))
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end_time:
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not pending:
                break
            time.sleep(self.interval)
        return replies

    def __getattr__(self, name: str):
        # Anything a Flower Grid has beyond the abstract interface (e.g. close()).
        if name == "grid":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.grid, name)
