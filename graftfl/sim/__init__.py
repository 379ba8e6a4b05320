"""Fast simulation: the deployment's ServerApp and ClientApp in one process, without Ray (``sim.backend=inprocess``)."""

from graftfl.sim.grid import InProcessGrid
from graftfl.sim.runner import BACKENDS, inprocess_threads, inprocess_workers, run_inprocess, sim_backend

__all__ = ["BACKENDS", "InProcessGrid", "inprocess_threads", "inprocess_workers", "run_inprocess", "sim_backend"]
