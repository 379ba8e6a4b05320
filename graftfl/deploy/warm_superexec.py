"""A SuperExec whose ClientApp processes start warm: forked from a process that imported everything once.

Flower 1.41 runs every message a SuperNode receives in a fresh ``flwr-clientapp``
process (one process, one task), started by a ``flower-superexec`` that polls the
SuperNode's Runtime API. With ``flower-supernode --isolation process`` that SuperExec
is started by the caller instead of by the SuperNode. This module is such a caller's
SuperExec: Flower's own ``flower-superexec`` main loop with one change, the executor.
Instead of ``exec``-ing ``flwr-clientapp`` (a new interpreter that imports Flower, torch,
graftfl and the data libraries again, seconds per message), it ``fork``s this process,
which imported them once at start, and the child runs Flower's ``run_clientapp`` for
the task's token -- the same function ``flwr-clientapp`` runs. The child is still a
fresh process per message: nothing of one message's state reaches the next except
through Flower (``context.state``), exactly as with ``flwr-clientapp``.

The preloaded graftfl is the SuperNode environment's (as on a site's machine, where
the apps run with the site's installed packages), not the FAB's copy: run it where
the installed graftfl is the one the run was submitted from, which ``deploy-local``
guarantees (it builds the FAB from the checkout it runs).

Usage (what ``graftfl deploy-local`` starts next to each ``flower-supernode --isolation process``)::

    python -m graftfl.deploy.warm_superexec --insecure --runtime-api-address 127.0.0.1:9094
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

# Imported once in the parent; a protocol's client module imports torch and graftfl's core.
PRELOAD = (
    "flwr.supernode.runtime.run_clientapp",
    "graftfl.clients.app",
    # Lazy imports of the data path (registry datasets, partitioning); absent ones are skipped.
    "sklearn.datasets",
    "flwr_datasets.partitioner",
    "datasets",
)


def preload() -> float:
    """Import what every ClientApp message needs, and every registered protocol's and phase's client module; seconds taken."""
    started = time.perf_counter()
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError as err:  # an optional data library: the child imports it if a message needs it
            logger.info("warm SuperExec: not preloading %s (%s)", module, err)
    from graftfl.protocols import load_client_phase, load_client_protocol, phase_names, protocol_names

    for name in protocol_names():
        load_client_protocol(name)
    for name in phase_names():
        load_client_phase(name)
    warm_up_torch()
    return time.perf_counter() - started


def warm_up_torch() -> None:
    """Run once what every training message's first call pays for: the FLOP counter and an optimizer step.

    torch imports hundreds of modules (``torch._dynamo``, sympy) the first time a
    ``FlopCounterMode`` is entered (graftfl meters every local round with one): ~2 s per
    fresh process. The warm-up runs on one thread, so no OpenMP thread pool exists when
    children are forked, and it leaves torch's random generator as it found it, so a child
    starts from the same state as a fresh ``flwr-clientapp`` process.
    """
    import torch

    from graftfl.core.meter import train_flops_per_sample

    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 3))
        x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
        train_flops_per_sample(model, x, torch.nn.functional.cross_entropy, y)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    finally:
        torch.set_rng_state(rng)
        _RESTORE["threads"] = threads


_RESTORE: dict[str, int] = {}  # what a forked child sets back (the warm-up ran on one thread)


def _reset_inherited_flower_state() -> None:
    """In a forked child: forget the parent SuperExec's exit handlers and signal handlers.

    The parent registered handlers that close its Runtime API client and executor; run in
    the child at exit they would act on the parent's connections. ``run_clientapp``
    registers its own.
    """
    from flwr.supercore.exit import exit_handler

    exit_handler.registered_exit_handlers.clear()
    exit_handler._lock_handlers = threading.Lock()  # a lock held by another parent thread at fork would never be released here
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    if "threads" in _RESTORE:  # the thread count a fresh process would have (OMP_NUM_THREADS or the cores)
        import torch

        torch.set_num_threads(_RESTORE["threads"])


def run_task_in_child(spec) -> None:
    """The forked child: run Flower's ClientApp task for ``spec`` (an ``ExecutionSpec``), then exit without returning."""
    code = 1
    try:
        _reset_inherited_flower_state()
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as done:  # run_clientapp ends with flwr_exit -> sys.exit
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: B036 -- whatever happens, the child must not return into the parent's loop
        logger.exception("warm SuperExec: ClientApp task failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkExecutor:
    """Flower's executor protocol: ClientApp tasks in forked children, every other task type as Flower's subprocess.

    Parameters
    ----------
    fallback : object
        Flower's ``SubprocessExecutor`` for the task types this executor does not fork.
    """

    def __init__(self, fallback):
        self.fallback = fallback
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, **kwargs):
        """Every supported task type can start at once (as with Flower's subprocess executor)."""
        return self.fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, *args, **kwargs) -> None:
        """No capacity gate."""
        return self.fallback.wait_for_capacity(*args, **kwargs)

    def launch(self, spec):
        """Fork a child for a ClientApp task; other task types go to the fallback."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_task_in_child(spec)  # never returns
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (called by Flower's loop between task polls)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Stop children still running (SuperExec shutdown), then the fallback."""
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.fallback.close()


def main() -> None:
    """``flower-superexec``'s command line, with ClientApp tasks forked from this preloaded process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    seconds = preload()
    logger.info("warm SuperExec: preloaded ClientApp modules in %.2f s (pid %d)", seconds, os.getpid())
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec as superexec_loop

    flower_get_executor = superexec_loop.get_executor

    def get_executor(*args, **kwargs):
        return ForkExecutor(flower_get_executor(*args, **kwargs))

    superexec_loop.get_executor = get_executor  # the one seam: Flower's loop asks this module-level name for its executor
    flower_superexec()


if __name__ == "__main__":
    main()
