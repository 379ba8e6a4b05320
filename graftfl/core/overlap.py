"""Which parts of a simulated client's work may run beside another client's: its training loop, above all.

The in-process simulation can serve several clients' messages at once, one per worker thread
(``sim.client_workers``). Most of what a client does around its training loop touches state the
whole process shares; torch's global random generator above all, which a seeded model build
draws from: another client seeding between one client's seeding and its build would change
that build, and the run would no longer repeat. So a worker serves a message holding one lock
(:func:`exclusive`), and a training loop that draws nothing from the global generator lets the
lock go while it computes (:func:`overlapping`): its forward and backward passes, where the
time is, run beside the next client's. So do scoring a model and encoding a reply's weights,
which read only the client's own tensors; everything else runs one client at a time.

Where no worker holds a lock (deployment, Ray, a single in-process worker) both are no-ops.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from torch import nn

_held = threading.local()  # the lock this thread serves its message under, if any

# Modules that draw from torch's global generator in training mode: a loop through them keeps the lock.
GLOBAL_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU)


@contextmanager
def exclusive(lock: threading.Lock) -> Iterator[None]:
    """Hold ``lock`` while the calling thread serves a message (releasing it only in :func:`overlapping`)."""
    lock.acquire()
    _held.lock = lock
    try:
        yield
    finally:
        _held.lock = None
        lock.release()


@contextmanager
def overlapping(model: nn.Module | None = None) -> Iterator[None]:
    """Let other clients' work run while this block runs ``model`` (or, without one, converts data); taken back after.

    The block must touch no state other threads use and draw nothing from torch's global
    random generator: a training loop's batches come from a loader with a generator of its
    own (:func:`graftfl.core.data.make_loader`); encoding a reply reads only this client's
    tensors. A model with modules that draw from the generator (dropout) keeps the lock, so
    its run still repeats.
    """
    lock = getattr(_held, "lock", None)
    if lock is None or (model is not None and draws_global_randomness(model)):
        yield
        return
    lock.release()
    try:
        yield
    finally:
        lock.acquire()


def draws_global_randomness(model: nn.Module) -> bool:
    """Whether training ``model`` draws from torch's global generator (a dropout or RReLU module)."""
    return any(isinstance(module, GLOBAL_RANDOM_MODULES) for module in model.modules())
