"""The DSSGD tests' grid: the shared in-process :class:`~tests.helpers.FakeGrid`.

It delivers each message to the real client handler with a per-node ``Context``
(so ``context.state`` persists between rounds, as on a SuperNode) and can drop
or tamper with replies to exercise the server's checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from flwr.app import Message

from graftfl.config import compose_config
from graftfl.server_app.app import run_protocol
from tests.conftest import flower_task_identity
from tests.helpers import FakeGrid

server_identity = flower_task_identity  # messages built outside Flower's runtimes need a task


def LocalGrid(num_nodes: int, tamper: Callable[[int, Message], Message] | None = None, silent: set[int] | None = None) -> FakeGrid:
    """The shared :class:`~tests.helpers.FakeGrid` with DSSGD's node ids 101, 102, ... (node ``101 + i`` holds partition ``i``).

    ``tamper(node, reply) -> reply`` breaks uploads; ``silent`` nodes never reply.
    """
    return FakeGrid(num_nodes, first_node_id=101, tamper=tamper, silent=silent)


def run_local(tmp_path: Path, overrides: list[str], grid: FakeGrid, base: list[str]) -> Path:
    """The real DSSGD ServerApp pipeline over ``grid`` with ``base + overrides``, writing under ``tmp_path``; its run dir."""
    cfg = compose_config([*base, f"output_dir={tmp_path}", *overrides])
    with server_identity():
        return run_protocol(grid, cfg)
