"""The ``graftfl`` command: ``sim``, ``deploy-local`` and the protocols' own commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from graftfl.commands.audit import add_command as add_audit_command
from graftfl.config import ConfigError, expand_sweep, is_site_dataset, resolve_job_config
from graftfl.console import show_progress
from graftfl.core.data import DatasetUnavailable, raw_from_config
from graftfl.core.normalization import fixed_statistics
from graftfl.core.run_dir import project_root, run_dir_of, with_run_id
from graftfl.prepare_sites import add_commands as add_prepare_sites_command
from graftfl.protocols import load_protocol, protocol_commands


logger = logging.getLogger(__name__)


def simulate(cfg, data_dir: str | os.PathLike | None = None, ray_address: str | None = None) -> Path:
    """Run one composed config in Flower's simulation runtime, or directly when not federated.

    ``sim.backend``: ``ray`` (Flower's Ray backend) or ``inprocess`` (:mod:`graftfl.sim`: the same
    ServerApp and ClientApp in this process, one client message at a time, no Ray).

    ``data_dir`` (``--data-dir sites/``): virtual SuperNode *i* reads ``<data_dir>/site-<i>``
    (given as ``GRAFTFL_DATA_DIR``: flwr's simulation sets no per-node node config).
    ``ray_address`` (``--ray-address``, else ``sim.ray_address``): attach to that Ray cluster
    instead of starting one (:mod:`graftfl.ray_cluster`).
    """
    import graftfl.ray_cluster as ray_cluster
    from graftfl.server_app.app import make_server_app, run_protocol

    cfg = with_run_id(cfg)
    if not is_site_dataset(cfg):  # dataset=site: the sites' files are theirs; the server process opens none
        raw = raw_from_config(cfg.dataset)  # fail fast (and cache for the in-process ServerApp) before Ray starts
        try:  # dataset.mean / std that do not fit the channels: an error now, not at every site
            fixed_statistics(cfg.dataset, raw.input_shape[0])
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if not load_protocol(cfg.protocol.name).federated:
        return run_protocol(None, cfg)
    from flwr.simulation import run_simulation

    from graftfl.clients.app import app as client_app
    from graftfl.clients.site_data import DATA_DIR_ENV
    from graftfl.clients.split_turns import ALLOW_SERVER_EVAL_ENV
    from graftfl.core.dedup.keys import SALT_ENV_VAR as DEDUP_SALT_ENV
    from graftfl.core.handoff import KEY_ENV as SPLIT_KEY_ENV
    from graftfl.sim import inprocess_threads, inprocess_workers, run_inprocess, sim_backend
    from graftfl.sim.node_ids import partition_ordered_node_ids

    backend = sim_backend(cfg)  # config errors before anything starts
    client_workers = inprocess_workers(cfg)
    if backend == "inprocess" and ray_cluster.ray_address_of(cfg, ray_address):
        raise ConfigError("sim.backend=inprocess runs without Ray: drop sim.ray_address / --ray-address, or use sim.backend=ray")

    # Ray workers must import this checkout's graftfl, whatever their working directory.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project_root()), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray_address = ray_cluster.ray_address_of(cfg, ray_address)
    backend_config = ray_cluster.backend_config(cfg, ray_address)
    # protocol.handoff=relay: the clients' key comes from their environment, as in deployment. Without the
    # caller's GRAFTFL_SPLIT_KEY, a fresh random key for this run only (Ray workers inherit it at start).
    own_key = not os.environ.get(SPLIT_KEY_ENV)
    if own_key:
        os.environ[SPLIT_KEY_ENV] = os.urandom(32).hex()
    # dedup=psi: the salt the sites share, by the same rule (the ServerApp shares this process but never reads it).
    own_salt = not os.environ.get(DEDUP_SALT_ENV)
    if own_salt:
        os.environ[DEDUP_SALT_ENV] = os.urandom(32).hex()
    # Every simulated site is the caller's: its acknowledgement in the config is the sites' consent too.
    # Features sites write under a folder of their own choosing; on this one machine: beside the run.
    own_sites_dir = "GRAFTFL_SITES_DIR" not in os.environ
    if own_sites_dir:
        os.environ["GRAFTFL_SITES_DIR"] = str((run_dir_of(cfg) / "sites").resolve())
    own_data_dir = data_dir is not None
    if own_data_dir:
        if not Path(data_dir).is_dir():
            raise ConfigError(f"--data-dir {data_dir} is not a folder (expected site-0/, site-1/, ... as graftfl prepare-sites writes)")
        os.environ[DATA_DIR_ENV] = str(Path(data_dir).resolve())
    allow_server_eval = bool((cfg.get("eval") or {}).get("server_reveals_bottom")) and ALLOW_SERVER_EVAL_ENV not in os.environ
    if allow_server_eval:
        os.environ[ALLOW_SERVER_EVAL_ENV] = "1"
    started = time.time()
    try:
        if backend == "inprocess":  # graftfl.sim: same apps, one process, no Ray (docs/benchmarks.md, "Simulation backends")
            run_inprocess(make_server_app(cfg), client_app, num_supernodes=cfg.num_clients, client_threads=inprocess_threads(cfg),
                          seed=int(cfg.seed), client_workers=client_workers)
        else:
            if ray_address:  # after the GRAFTFL_* variables above are set: the cluster's workers get them from here
                ray_cluster.attach(ray_address)
            else:  # as Flower would, but a start that timed out on a loaded machine is retried
                ray_cluster.start_local(backend_config)
            with partition_ordered_node_ids(int(cfg.seed)):  # split turns, DSSGD's order: the partitions' in every run
                run_simulation(make_server_app(cfg), client_app, num_supernodes=cfg.num_clients, backend_config=backend_config)
    finally:
        if backend != "inprocess":  # Flower shuts Ray down when the simulation ends; a run that failed before may not have
            ray_cluster.detach()
        if own_key:
            os.environ.pop(SPLIT_KEY_ENV, None)
        if own_salt:
            os.environ.pop(DEDUP_SALT_ENV, None)
        if allow_server_eval:
            os.environ.pop(ALLOW_SERVER_EVAL_ENV, None)
        if own_sites_dir:
            os.environ.pop("GRAFTFL_SITES_DIR", None)
        if own_data_dir:
            os.environ.pop(DATA_DIR_ENV, None)
    run_dir = run_dir_of(cfg)
    summary = run_dir / "summary.json"
    if not summary.exists() or summary.stat().st_mtime < started - 1:  # resume: the old run's summary does not count
        raise RuntimeError(f"the simulation ended without finishing the run (no new {summary}); see the log above")
    return run_dir


def cmd_sim(args: argparse.Namespace) -> int:
    """``graftfl sim``: run each job in Flower's simulation runtime; prints ``run: <dir>`` per job."""
    jobs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
    for number, overrides in enumerate(jobs):
        if args.multirun:
            logger.info("[multirun] job %d: %s", number, " ".join(overrides))
        run_dir = simulate(resolve_job_config(overrides), data_dir=args.data_dir, ray_address=args.ray_address)
        print(f"run: {run_dir}", flush=True)
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    """``graftfl deploy-local``: run the job on a local SuperLink and SuperNodes; prints ``run: <dir>``."""
    from graftfl.deploy import deploy_local

    from graftfl.deploy import DeploymentError

    cfg = resolve_job_config(args.overrides)
    try:
        run_dir = deploy_local(cfg, args.overrides, tls=args.tls or args.auth, auth=args.auth, data_dir=args.data_dir,
                               isolation=args.isolation)
    except DeploymentError as err:
        print(f"graftfl: deployment failed: {err}", file=sys.stderr)
        return 1
    print(f"run: {run_dir}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``graftfl`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="graftfl", description="Split and privacy-preserving federated learning on Flower.")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("sim", help="run in Flower's simulation runtime", description="Hydra overrides, e.g. protocol=split dataset=digits rounds=5")
    sim.add_argument("-m", "--multirun", action="store_true", help="expand sweeps: a=1,2 b=x,y (and an experiment's `sweep:`)")
    sim.add_argument("--data-dir", help="sites' own data: virtual SuperNode i reads DATA_DIR/site-<i> (graftfl prepare-sites layout)")
    sim.add_argument("--ray-address", help="attach to this Ray cluster (ray start --head ...) instead of starting one; "
                     "overrides sim.ray_address")
    sim.add_argument("overrides", nargs="*")
    sim.set_defaults(handler=cmd_sim)
    deploy = commands.add_parser("deploy-local", help="run on a real flower-superlink + flower-supernodes on loopback")
    deploy.add_argument("--tls", action="store_true", help="throwaway CA and certificates; TLS on every connection")
    deploy.add_argument("--auth", action="store_true", help="SuperNode authentication with generated keys (implies --tls)")
    deploy.add_argument("--data-dir", help="sites' own data: SuperNode i gets node-config data-path=DATA_DIR/site-<i>")
    deploy.add_argument("--isolation", choices=["warm", "process", "subprocess"], default="warm",
                        help="how each message's ClientApp process starts: warm (forked from a preloaded SuperExec; default), "
                             "or Flower's flwr-clientapp started by a SuperExec of ours (process) or of the SuperNode (subprocess)")
    deploy.add_argument("overrides", nargs="*")
    deploy.set_defaults(handler=cmd_deploy_local)
    add_prepare_sites_command(commands)
    add_audit_command(commands)
    for add_commands in protocol_commands():  # e.g. features' `serve` and `predict`
        add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``graftfl`` command; returns the exit status (config errors are reported, not raised)."""
    args = build_parser().parse_args(argv)
    show_progress()  # round progress and rejected replies on stderr; stdout ends with `run: runs/<id>`
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"graftfl: config error: {err}", file=sys.stderr)
        return 2
    except DatasetUnavailable as err:
        print(f"graftfl: dataset unavailable: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graftfl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
