"""An in-process :class:`flwr.serverapp.Grid`: virtual SuperNodes run one message at a time in this process.

Flower's simulation (``run_simulation``) moves every message from the ServerApp to a
Ray actor and back, serializing it both ways. :class:`InProcessGrid` keeps Flower's
message semantics and drops the rest (the design of pfl-research): pushed messages
are queued, and the thread that asks for replies (``send_and_receive``,
``pull_messages``: the ServerApp's) runs them in order, calling the *same* ClientApp
object the deployment runs with the node's own :class:`~flwr.app.Context`.

Why not a worker thread: torch's OpenMP runtime (libgomp) gives every thread that runs a
parallel region a pool of its own, and once the process holds more OpenMP threads than
CPUs it spins only briefly before sleeping between regions (libgomp manual,
GOMP_SPINCOUNT). A second torch thread made a LeNet SGD step of batch 10 2.5x slower on
2 cores (4.9 ms instead of 1.9 ms), far more than all of the message handling. What
Flower's simulation does, this grid does too:

- node ids are drawn as Flower draws them (random 64-bit integers); node ``i`` has node
  config ``partition-id=i``, ``num-partitions=N`` and a ``state`` RecordDict that persists
  across its messages. Unlike Flower, partition ids follow the ascending order of the node
  ids, so that the order in which a protocol visits sorted node ids is the partition order
  (Flower's simulation pairs them at random, which makes split's turn order vary by run);
- a message the link state would refuse (unknown node, expired TTL, ...) is logged
  and dropped, so that no reply comes, as in Flower;
- the client gets a copy of the message and the server a copy of the reply
  (:func:`graftfl.sim.messages.copy_message`), so neither can change the other's records;
- an exception in the ClientApp becomes an error reply (code
  ``CLIENT_APP_RAISED_EXCEPTION``) and the node's context keeps its state from before
  that message, as when a Ray actor fails;
- ``send_and_receive`` returns the replies that arrived within ``timeout`` seconds. A
  client is never interrupted (nor is a Ray actor): after the timeout no further
  message is started, and a client that hangs holds up the run.

With ``client_workers`` > 1 the messages run on that many threads instead, each with the
clients' torch thread count (:mod:`graftfl.sim.workers`), as Ray runs several actors: with one
torch thread per client no thread starts an OpenMP pool, and on 2 cores two LeNet clients
train at about twice the rate of one. Only their training loops overlap
(:mod:`graftfl.core.overlap`), so a run computes what it computes one client at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager, nullcontext
from uuid import uuid4

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NODE_ID_NUM_BYTES, NUM_PARTITIONS_KEY, PARTITION_ID_KEY, RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from graftfl.sim.messages import (
    copy_message, copy_records, error_reply, hash_arrays, instruction_problems, mark_delivered, reply_problems,
)
from graftfl.sim.node_ids import seeded_ids
from graftfl.sim.workers import ClientWorkers

log = logging.getLogger(__name__)


def new_node_id(taken: set[int]) -> int:
    """A node id drawn as Flower's link state draws one (random, never 0 or the SuperLink's id, never taken)."""
    return generate_rand_int_from_bytes(NODE_ID_NUM_BYTES, exclude={SUPERLINK_NODE_ID, 0, *taken})


@contextmanager
def client_thread_count(threads: int | None):
    """Torch threads ``threads`` while a client runs (as a Ray actor with ``client_resources.num_cpus`` has them)."""
    if not threads:
        yield
        return
    process_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(process_threads)


class InProcessGrid(Grid):
    """A Grid whose SuperNodes are virtual clients in this process, served one message at a time.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The ClientApp every node runs (the deployment's own).
    num_supernodes : int
        How many virtual SuperNodes to register (partition ids ``0 .. N-1``).
    client_threads : int, optional
        Torch threads while a client runs (as a Ray actor with ``client_resources.num_cpus``
        has them); the process's count is restored after each message. None: the
        process's count.
    seed : int, optional
        Node ids from :func:`graftfl.sim.node_ids.seeded_ids` (the same in every run with this
        seed, as ``graftfl sim`` gives the Ray backend); None: drawn at random, as Flower does.
    client_workers : int
        Messages served side by side (``sim.client_workers``): 1 runs them in the asking thread;
        more runs them on that many :class:`~graftfl.sim.workers.ClientWorkers`, each node's in
        the order pushed, with only the clients' training loops overlapping.
    """

    def __init__(self, client_app: ClientApp, num_supernodes: int, client_threads: int | None = None, seed: int | None = None,
                 client_workers: int = 1):
        if int(num_supernodes) < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        if int(client_workers) < 1:
            raise ValueError(f"client_workers must be >= 1, got {client_workers}")
        self.client_app = client_app
        self.client_threads = client_threads
        self._workers = ClientWorkers(int(client_workers), client_threads) if int(client_workers) > 1 else None
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = 1
        self._run = run
        drawn: set[int] = set()
        seeded = seeded_ids(seed) if seed is not None else None
        for _ in range(int(num_supernodes)):
            drawn.add(next(seeded) if seeded is not None else new_node_id(drawn))
        # Ascending ids in partition order: a protocol that walks the nodes in id order (split turns, DSSGD's
        # round robin) then walks them in partition order, so that a seeded run is reproducible on this path.
        self.node_ids: list[int] = sorted(drawn)
        self.contexts = {
            node_id: Context(
                run_id=run.run_id,
                node_id=node_id,
                node_config={PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: len(self.node_ids)},
                state=RecordDict(),
                run_config={},
            )
            for partition_id, node_id in enumerate(self.node_ids)
        }
        self._pending: deque[Message] = deque()
        self._replies: dict[str, Message] = {}  # instruction message id -> reply not yet pulled
        self._lock = threading.Lock()  # guards the queue and the replies
        self._serving = threading.Lock()  # one message at a time, whichever thread asks for replies
        self._stopped = False
        self.messages_handled = 0
        self.client_seconds = 0.0  # time spent inside the ClientApp (a Flower simulation reports the same)

    # ----------------------------------------------------------------- Grid API
    def set_run(self, run: Run) -> None:
        """Operate in ``run`` (messages must carry its run id)."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        for context in self.contexts.values():
            context.run_id = run.run_id

    @property
    def run(self) -> Run:
        """A copy of the run this grid operates in."""
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A new instruction message (deprecated in Flower in favour of the ``Message`` constructor)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The ids of the virtual SuperNodes (all connected from the start)."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue ``messages`` for their nodes; returns the ids of those accepted (a refused one is logged, as in Flower)."""
        accepted = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            problems = instruction_problems(message, self._run.run_id, self.contexts)
            if problems:
                log.error("message to node %s refused: %s", message.metadata.dst_node_id, "; ".join(problems))
                continue
            accepted.append(message)
        with self._lock:
            if self._stopped:
                raise RuntimeError("the in-process grid is closed")
            self._pending.extend(copy_message(message) for message in accepted)  # the server keeps its own object
        return [message.metadata.message_id for message in accepted]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies for ``message_ids``, after every queued message has been run (each reply is returned once)."""
        if self._workers is not None:
            self._serve_side_by_side(None, lambda: True)
        while self._run_next():
            pass
        with self._lock:
            found = [self._replies.pop(message_id) for message_id in list(message_ids) if message_id in self._replies]
        return [mark_delivered(reply) for reply in found]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, run the queue and return the replies that arrived within ``timeout`` seconds (None: all).

        Clients run in the calling thread (or on the workers, ``client_workers`` > 1), and a client is
        never interrupted: once the timeout has passed no further message is started, and a reply that
        came in after it stays for :meth:`pull_messages` (as a late reply stays in Flower's link state).
        Replies come in the order their messages were pushed.
        """
        pushed = list(self.push_messages(messages))
        waiting = set(pushed)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        in_time = lambda: deadline is None or time.monotonic() < deadline  # noqa: E731
        if self._workers is not None:
            arrived = self._serve_side_by_side(waiting, in_time)
            return [mark_delivered(arrived[message_id]) for message_id in pushed if message_id in arrived]  # in the order pushed
        while waiting and in_time():
            with self._lock:
                arrived = [message_id for message_id in waiting if message_id in self._replies]
                replies.extend(self._replies.pop(message_id) for message_id in arrived)
            waiting.difference_update(arrived)
            if not waiting or not self._run_next():
                break
        return [mark_delivered(reply) for reply in replies]

    # ------------------------------------------------------------------ clients
    def close(self) -> None:
        """Refuse new messages; those still queued get no reply."""
        with self._lock:
            self._stopped = True
            self._pending.clear()
        if self._workers is not None:
            self._workers.close()

    def _run_next(self) -> bool:
        """Run the oldest queued message in this thread and store its reply; False when the queue was empty."""
        with self._serving:
            with self._lock:
                if not self._pending:
                    return False
                message = self._pending.popleft()
            with client_thread_count(self.client_threads):
                reply = self.handle(mark_delivered(message))
            if reply is not None:
                with self._lock:
                    self._replies[message.metadata.message_id] = reply
            return True

    def _serve_side_by_side(self, waiting: set[str] | None, in_time: Callable[[], bool]) -> dict[str, Message]:
        """Serve queued messages on the workers until every id in ``waiting`` has its reply (None: the queue is empty).

        A node's messages start in the order pushed, one at a time. Once ``in_time()`` is false no
        further message starts; those running finish (a client is never interrupted). Returns the
        replies to ``waiting`` that arrived while ``in_time()`` held, taken out of the store.
        """
        collected: dict[str, Message] = {}
        running: dict[Future, int] = {}  # the message being served -> its node
        with self._serving:
            while True:
                if in_time():
                    with self._lock:
                        for message_id in (waiting or set()) - collected.keys():
                            if message_id in self._replies:
                                collected[message_id] = self._replies.pop(message_id)
                wanted = waiting is None or len(collected) < len(waiting)
                while wanted and in_time() and len(running) < self._workers.count:
                    message = self._next_startable(set(running.values()))
                    if message is None:
                        break
                    running[self._workers.submit(self._serve_one, message)] = message.metadata.dst_node_id
                if not running:
                    return collected
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    del running[future]
                    future.result()  # a client's exception is already its error reply: this raises only the grid's own faults

    def _next_startable(self, busy_nodes: set[int]) -> Message | None:
        """The oldest queued message whose node is free and has no older message queued, taken off the queue."""
        with self._lock:
            passed: set[int] = set()
            for position, message in enumerate(self._pending):
                node = message.metadata.dst_node_id
                if node not in busy_nodes and node not in passed:
                    del self._pending[position]  # by position: deque.remove would compare messages' contents
                    return message
                passed.add(node)
        return None

    def _serve_one(self, message: Message) -> None:
        """A worker's part: run ``message``'s ClientApp and store the reply."""
        reply = self.handle(mark_delivered(message))
        if reply is not None:
            with self._lock:
                self._replies[message.metadata.message_id] = reply

    def handle(self, message: Message) -> Message | None:
        """Run the ClientApp on ``message`` with its node's context; the reply to store (None when Flower would drop it)."""
        node_id = message.metadata.dst_node_id
        stored = self.contexts[node_id]
        # The handler works on a copy: the node's state changes only when the message succeeds, as with a Ray actor.
        context = Context(run_id=stored.run_id, node_id=node_id, node_config=dict(stored.node_config),
                          state=copy_records(stored.state), run_config=dict(stored.run_config))
        started = time.perf_counter()
        try:
            with self._workers.client_turn() if self._workers is not None else nullcontext():
                reply = self.client_app(message=message, context=context)
            if isinstance(reply, Message):
                reply.metadata.__dict__["_message_id"] = str(uuid4())  # what Flower's worker sets before storing it
            problems = reply_problems(reply, message)
            if problems:
                log.error("reply of node %s to %s dropped: %s", node_id, message.metadata.message_type, "; ".join(problems))
                return None
            hash_arrays(reply)  # as a SuperNode's push does, beside other clients: the ServerApp's thread counts its bytes
            self.contexts[node_id] = context
        except Exception as err:  # every failure of a client becomes its error reply; the run goes on
            log.error("node %s failed on %s: %s", node_id, message.metadata.message_type, err)
            reply = error_reply(message, err)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
        finally:
            with self._lock:  # workers may finish at the same time
                self.client_seconds += time.perf_counter() - started
                self.messages_handled += 1
        return copy_message(reply)  # the client may keep references into its reply
