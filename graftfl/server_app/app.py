"""The one ServerApp: compose the config, pick the protocol's strategy, write the run directory."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from graftfl.config import normalization_of, resolve_job_config, to_yaml
from graftfl.console import show_progress
from graftfl.core.allocator import keep_freed_memory
from graftfl.core.denormals import flush_denormals
from graftfl.core.run_dir import run_dir_of, with_run_id
from graftfl.protocols import load_phase, load_protocol
from graftfl.strategies.utils import ServerRun, wait_for_nodes

logger = logging.getLogger(__name__)


def phase_plan(cfg: DictConfig) -> list[str]:
    """The pre-training phases a run runs, in order: the one place that decides it.

    ``dedup`` (``dedup=psi``) first, so that later phases see only the kept rows; then
    ``normalize`` when the dataset's normalization is federated (``dataset=site`` by
    default; a registry dataset with ``dataset.normalization=federated``); then the config's own ``phases`` list.
    """
    plan = []
    if cfg.get("dedup") and cfg.dedup.get("name") == "psi":
        plan.append("dedup")
    if normalization_of(cfg) == "federated":
        plan.append("normalize")
    return plan + [name for name in (cfg.get("phases") or []) if name not in plan]


def run_phases(grid: Grid | None, run: ServerRun) -> dict:
    """Run the pre-training phases of :func:`phase_plan` once, in order; ``{phase: its summary fields}``.

    Every phase sees the same connected sites, before the protocol's own rounds
    (a resumed run runs them again: a fresh site process has no phase state).
    """
    names = phase_plan(run.cfg)
    if not names:
        return {}
    if grid is None:
        raise ValueError(f"phases={names} need a federated protocol; protocol '{run.cfg.protocol.name}' runs without sites")
    node_ids = wait_for_nodes(grid, run.cfg.num_clients, run.cfg.timeout_s)
    summaries = {}
    for name in names:
        logger.info("[%s] phase %s on %d sites", run.cfg.protocol.name, name, len(node_ids))
        summaries[name] = load_phase(name).run(grid, run, node_ids) or {}
    return summaries


def run_protocol(grid: Grid | None, cfg: DictConfig) -> Path:
    """Run ``cfg.protocol`` to the end and write config, metrics, summary and plots."""
    keep_freed_memory()  # the rounds free and allocate the same buffers again and again
    if not flush_denormals(bool(cfg.get("flush_denormal", False))):  # set either way: a previous run may have set it
        logger.warning("flush_denormal=true: this CPU cannot flush denormal floats; the run computes with them")
    cfg = with_run_id(cfg)
    run_dir = run_dir_of(cfg)
    if cfg.resume and not run_dir.is_dir():
        raise FileNotFoundError(f"resume={cfg.resume}: no such run directory")
    run = ServerRun(cfg, run_dir, resume=bool(cfg.resume))
    run.recorder.write_config(to_yaml(cfg))
    protocol = load_protocol(cfg.protocol.name)
    phases = run_phases(grid, run)
    extra = protocol.run(grid, run) or {}
    if phases:
        extra["phases"] = phases
    run.recorder.write_summary(
        protocol=cfg.protocol.name,
        dataset=cfg.dataset.name,
        num_clients=cfg.num_clients,
        rounds=cfg.rounds,
        run_id=cfg.run_id,
        **extra,
    )
    run.recorder.plot(title=f"{cfg.protocol.name} on {cfg.dataset.name}")
    return run_dir


def make_server_app(cfg: DictConfig) -> ServerApp:
    """A ServerApp bound to an already composed config (simulation passes no run config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_protocol(grid, cfg)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: ``flwr run . <conn> --run-config "overrides='protocol=fedavg dataset=digits'"``."""
    show_progress()  # this process has no `graftfl` command to set up the console
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    from graftfl.server_app.prompt_grid import PromptGrid  # Flower's deployed Grid pulls replies every 3 s

    run_protocol(PromptGrid(grid), resolve_job_config(overrides))
