"""Denormal floats as zero (``flush_denormal``) in the thread that computes and in its OpenMP team.

x86 keeps its flush-to-zero and denormals-are-zero bits in each thread's MXCSR register, and
``torch.set_flush_denormal`` sets them for the calling thread only. torch's CPU kernels split
large ops over the calling thread's OpenMP team (libgomp), whose threads keep the bits they had;
only threads started later copy them from the thread that starts them. Measured with 2 torch
threads: set after the team existed, the flag flushed half of an elementwise product's
denormals. So :func:`flush_denormals` also runs one OpenMP region, in which every thread sets
the flag for itself, as wide as the widest torch thread count this thread has called it with
(the pool's size where graftfl sets the counts; a team of threads this thread never had would
start a pool of its own, and a second pool beyond the machine's cores slowed every later LeNet
step in the process from 1.5 to 3.4-3.8 ms).

Why a run would want it: SGD multiplies the momentum of a weight whose gradient stays zero by
0.9 a step; after ~800 steps of one optimizer it falls below float32's normal range (1.2e-38),
and x86 computes with such denormals up to a hundred times slower. Centralized LeNet training
on 60,000 Fashion-MNIST rows ran at 3,760 samples/s instead of ~4,800
(``benchmarks/central_rows.py``). Flushed, those values become 0: other numerics than torch's
default, identical from run to run.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import torch

_TEAM_TASK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_applied = threading.local()  # the value this thread and its team were last given, and whether the CPU obeyed


def flush_denormals(enabled: bool) -> bool:
    """Treat denormal floats as zero in this thread's CPU arithmetic and its OpenMP team's, or stop.

    Cheap when the thread already has ``enabled`` (the data plane calls it for every frame).
    Threads torch starts later copy the flag from this one.

    Returns
    -------
    bool
        Whether the CPU obeys: False when ``enabled`` and it has no such mode (denormals stay).
    """
    enabled = bool(enabled)
    # the widest team this thread has asked for: its pool may hold threads a narrower team leaves out
    _applied.widest = max(getattr(_applied, "widest", 1), torch.get_num_threads())
    if getattr(_applied, "value", None) is enabled:
        return _applied.obeyed
    supported = torch.set_flush_denormal(enabled)
    in_team(lambda: torch.set_flush_denormal(enabled), _applied.widest)
    _applied.value, _applied.obeyed = enabled, supported or not enabled
    return _applied.obeyed


def in_team(task, threads: int) -> bool:
    """Run ``task()`` once in each thread of an OpenMP team of ``threads`` started from this thread (this one
    included), through the libgomp that torch loaded; False where there is none (then nothing ran but
    the caller's own setting).

    libgomp keeps one pool per starting thread and reuses it for every team, torch's included; a
    team of at least the pool's size reaches every thread in it.
    """
    parallel = _gomp_parallel()
    if parallel is None or threads <= 1:
        return parallel is not None
    errors = []

    def each(_data):
        try:
            task()
        except BaseException as err:  # an exception must not cross the C frames
            errors.append(err)

    callback = _TEAM_TASK(each)  # kept referenced until the region has ended
    parallel(callback, None, int(threads), 0)
    if errors:
        raise errors[0]
    return True


@functools.cache
def _gomp_parallel():
    """libgomp's ``GOMP_parallel`` as torch loaded it, or None (no /proc, another OpenMP runtime, or several
    libgomp copies none of which is torch's)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    loaded = sorted({line.split()[-1] for line in maps.splitlines() if "/libgomp" in line.split()[-1]})
    torch_lib = str(Path(torch.__file__).resolve().parent / "lib")
    own = [path for path in loaded if path.startswith(torch_lib)]
    chosen = own or (loaded if len(loaded) == 1 else [])
    if not chosen:
        return None
    parallel = ctypes.CDLL(chosen[0]).GOMP_parallel  # ctypes releases the GIL while the region runs
    parallel.argtypes = [_TEAM_TASK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return parallel
