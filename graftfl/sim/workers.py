"""Worker threads that serve an in-process grid's messages side by side (``sim.client_workers``).

A Ray simulation runs one actor per ``client_resources`` share in parallel; these threads do the
same inside the process, without moving a message anywhere. Each worker has the clients' torch
thread count for good, so a machine with C cores runs C / ``client_threads`` clients at once with
no OpenMP pool beyond its cores (``client_threads=1``: no pool at all; see the grid's module
docstring for what a second pool costs).

Each ClientApp call holds one lock shared by the workers (:meth:`ClientWorkers.client_turn`): only
the clients' training and scoring loops and reply encodings let it go (:func:`graftfl.core.overlap.overlapping`),
so what a client computes, and the run's weights, are those of one client at a time with the same
thread count (tested: ``tests/test_sim_workers.py``). The grid's own copies and checks of a message,
which touch nothing shared, run outside it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Callable

import torch

from graftfl.core.overlap import exclusive


class ClientWorkers:
    """``count`` threads with ``threads`` torch threads each, serving one message at a time apiece.

    Parameters
    ----------
    count : int
        Worker threads (at least 2; one worker is the grid's own thread).
    threads : int, optional
        Torch threads of each worker (``sim.client_threads``); None: the process's count.
    """

    def __init__(self, count: int, threads: int | None):
        if int(count) < 2:
            raise ValueError(f"ClientWorkers needs at least 2 workers, got {count}")
        self.count = int(count)
        self.lock = threading.Lock()  # held by the worker whose client runs outside a training loop
        process_threads = torch.get_num_threads()
        started = threading.Barrier(self.count + 1)

        def start_worker() -> None:
            # A thread's first torch call sets its OpenMP count from the process-wide default, which set_num_threads
            # also sets and which is the process's again once the workers run: make that first call now, then set.
            torch.get_num_threads()
            torch.set_num_threads(int(threads or process_threads))
            started.wait()

        self._pool = ThreadPoolExecutor(max_workers=self.count, thread_name_prefix="graftfl-client", initializer=start_worker)
        for _ in range(self.count):  # every thread starts now (the pool starts one per task while it has fewer)
            self._pool.submit(lambda: None)
        started.wait()
        torch.set_num_threads(process_threads)  # the default for threads started later: the process's, as before

    def submit(self, serve: Callable[..., None], *args) -> Future:
        """Run ``serve(*args)`` on a free worker."""
        return self._pool.submit(serve, *args)

    def client_turn(self) -> AbstractContextManager[None]:
        """Hold the workers' shared lock while a ClientApp runs (it lets go only where :mod:`graftfl.core.overlap` allows)."""
        return exclusive(self.lock)

    def close(self) -> None:
        """Wait for the messages being served and stop the threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)
