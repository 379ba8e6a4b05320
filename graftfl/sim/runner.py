"""Run a ServerApp against an :class:`~graftfl.sim.grid.InProcessGrid`: Flower's simulation without Ray."""

from __future__ import annotations

import logging
import os
import time

import torch
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import ServerApp
from flwr.supercore.task_identity import TaskIdentity

from graftfl.config import ConfigError
from graftfl.sim.grid import InProcessGrid

log = logging.getLogger(__name__)

BACKENDS = ("ray", "inprocess")


def sim_backend(cfg) -> str:
    """``sim.backend`` of a run config (``ray`` when the key is absent); a :class:`ConfigError` names the valid ones."""
    backend = str((cfg.get("sim") or {}).get("backend") or "ray")
    if backend not in BACKENDS:
        raise ConfigError(f"sim.backend must be one of {list(BACKENDS)}, got '{backend}'")
    return backend


def inprocess_threads(cfg) -> int | None:
    """Torch threads of an in-process client: ``sim.client_threads``, else ``client_resources.num_cpus`` (a Ray actor's)."""
    threads = (cfg.get("sim") or {}).get("client_threads")
    if threads is None:
        threads = (cfg.get("client_resources") or {}).get("num_cpus")
    if threads is None:
        return None
    if isinstance(threads, bool) or not float(threads).is_integer() or int(threads) < 1:
        raise ConfigError(f"sim.client_threads (or client_resources.num_cpus) must be a whole number >= 1, got {threads!r}")
    return int(threads)


def inprocess_workers(cfg) -> int:
    """Messages an in-process simulation serves side by side: ``sim.client_workers`` (1 when absent)."""
    workers = (cfg.get("sim") or {}).get("client_workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, (int, float)) or not float(workers).is_integer() or int(workers) < 1:
        raise ConfigError(f"sim.client_workers must be a whole number >= 1, got {workers!r}")
    return int(workers)


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_supernodes: int, client_threads: int | None = None,
                  seed: int | None = None, client_workers: int = 1) -> InProcessGrid:
    """Run ``server_app`` to the end with ``num_supernodes`` virtual SuperNodes running ``client_app`` in this process.

    The ServerApp runs in the calling thread, and so do the clients, one message at a time,
    when the ServerApp asks the grid for replies (the split data plane's gRPC server has
    threads of its own); ``client_workers`` > 1: on that many worker threads, side by side.
    ``seed``: node ids in partition order, the same in every run with it (:mod:`graftfl.sim.node_ids`).
    What the ServerApp raises is raised here. Returns the (closed) grid, whose ``messages_handled``
    and ``client_seconds`` (summed over the workers) say how much client work there was.
    """
    threads_in_all = client_workers * (client_threads or torch.get_num_threads())
    if client_workers > 1 and threads_in_all > (os.cpu_count() or 1):  # more torch threads than cores: they wait on each other
        log.warning("sim.client_workers=%d x %d torch threads each is more than this machine's %d cores", client_workers,
                    threads_in_all // client_workers, os.cpu_count() or 1)
    grid = InProcessGrid(client_app, num_supernodes, client_threads=client_threads, seed=seed, client_workers=client_workers)
    run_id = grid.run.run_id
    # Messages the ServerApp creates take their run and source from the task identity (as run_simulation sets it).
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    started = time.perf_counter()
    try:
        server_app(grid=grid, context=context)
    finally:
        grid.close()
    log.info("in-process simulation: %d messages, %.1f s in clients, %.1f s in all", grid.messages_handled, grid.client_seconds,
             time.perf_counter() - started)
    return grid
