"""The one ServerApp: compose the config, pick the protocol's strategy, write the run directory."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from graftfl.config import resolve_job_config, to_yaml
from graftfl.core.run_dir import run_dir_of, with_run_id
from graftfl.strategies.utils import ServerRun


def protocol_module(name: str):
    return importlib.import_module(f"graftfl.strategies.{name}")


def run_protocol(grid: Grid | None, cfg: DictConfig) -> Path:
    """Run ``cfg.protocol`` to the end and write config, metrics, summary and plots."""
    cfg = with_run_id(cfg)
    run_dir = run_dir_of(cfg)
    if cfg.resume and not run_dir.is_dir():
        raise FileNotFoundError(f"resume={cfg.resume}: no such run directory")
    run = ServerRun(cfg, run_dir, resume=bool(cfg.resume))
    run.recorder.write_config(to_yaml(cfg))
    extra = protocol_module(cfg.protocol.name).run(grid, run) or {}
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
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    run_protocol(grid, resolve_job_config(overrides))
