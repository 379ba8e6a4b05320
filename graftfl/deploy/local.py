"""``graftfl deploy-local``: a real Flower deployment on loopback, started and stopped for one run.

What happens, in order:

1. A temporary directory holds everything of the deployment: a ``FLWR_HOME`` whose
   ``config.toml`` names one SuperLink connection, the SuperLink database, logs,
   and with ``--tls``/``--auth`` the generated certificates and keys
   (:mod:`graftfl.deploy.flower_files` writes the files).
2. ``flower-superlink`` starts on a free loopback port (all its APIs share it).
3. With ``--auth``: one EC key pair per SuperNode, each public key registered with
   ``flwr supernode register`` (the SuperLink must be up; SuperNodes start after).
4. ``num_clients`` ``flower-supernode`` processes start, node ``i`` with
   ``--node-config "partition-id=i num-partitions=N"``; we wait until each has been
   accepted by the SuperLink (it logs its node id).
5. ``flwr run <project> <connection> --stream`` submits the app with the user's Hydra
   overrides plus ``run_id`` and an absolute ``output_dir``, so the ServerApp (another
   process, started by the SuperLink) writes ``<cwd>/runs/<run-id>``. ``--stream`` ends
   when the run ends.
6. Every process we started, and every process they started (``flower-superexec``,
   ``flwr-serverapp``, ``flwr-clientapp``), is stopped: on success, on failure and on
   Ctrl-C (:class:`graftfl.deploy.supervise.ProcessGroup`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig

from graftfl.core.dedup.keys import SALT_ENV_VAR as DEDUP_SALT_ENV
from graftfl.core.handoff import KEY_ENV as SPLIT_KEY_ENV
from graftfl.core.run_dir import project_root, run_dir_of, with_run_id
from graftfl.core.sitedata import DATA_PATH_KEY
from graftfl.deploy.flower_files import CONNECTION, run_config_overrides, tls_overrides, toml_string, write_flower_config, write_run_config
from graftfl.deploy.isolation import DEFAULT_ISOLATION, TASK_POLL_ENV, TASK_POLL_S, check_isolation, superexec_args, supernode_isolation_args
from graftfl.deploy.processes import flower_binary, free_loopback_ports, port_accepts
from graftfl.deploy.supervise import MARKER_ENV, DeploymentError, ManagedProcess, ProcessGroup, tail
from graftfl.tls import TlsFiles, generate_node_auth_keys, generate_tls_files

READY_TIMEOUT_S = 120.0  # ample on a loaded 2-core machine; a healthy start takes seconds
ACTIVATED_LINE = "SuperNode ID:"  # flower-supernode logs it once the SuperLink accepted it


@dataclass
class LocalDeployment:
    """A SuperLink and its SuperNodes on loopback, with everything in ``workdir``.

    Parameters
    ----------
    workdir : Path
        Temporary directory for FLWR_HOME, the SuperLink database, logs, certificates and keys.
    num_nodes : int
        How many SuperNodes to start (one per data partition).
    tls : bool
        Serve TLS with a throwaway CA (``graftfl.tls``).
    auth : bool
        SuperNode authentication with generated keys (needs ``tls``).
    cwd : Path
        Working directory of every process (relative data paths resolve as in ``graftfl sim``).
    isolation : str
        ``warm`` (default), ``process`` or ``subprocess``: how ClientApp processes start (:mod:`graftfl.deploy.isolation`).
    """

    workdir: Path
    num_nodes: int
    tls: bool = False
    auth: bool = False
    cwd: Path = field(default_factory=Path.cwd)
    echo: TextIO | None = None
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    tls_files: TlsFiles | None = None
    port: int = 0
    # The split-learning relay key (AES-256) is the clients' secret: a fresh one per run,
    # or the caller's GRAFTFL_SPLIT_KEY, given to the SuperNodes only (never the SuperLink).
    split_key: str = field(default_factory=lambda: os.environ.get(SPLIT_KEY_ENV) or os.urandom(32).hex())
    # The dedup salt (dedup=psi) is the sites' shared secret too: the same rule, its own value.
    dedup_salt: str = field(default_factory=lambda: os.environ.get(DEDUP_SALT_ENV) or os.urandom(32).hex())
    sites_dir: Path | None = None  # where features sites write (their own choice, given in their environment)
    data_dir: Path | None = None  # --data-dir: SuperNode i reads its own data at <data_dir>/site-<i> (node-config data-path)
    # How each message's ClientApp process starts (graftfl.deploy.isolation): "warm" forks it from a preloaded
    # SuperExec of ours; "subprocess" (Flower's default) and "process" start a fresh flwr-clientapp.
    isolation: str = DEFAULT_ISOLATION

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS (use --tls with --auth)")
        check_isolation(self.isolation)
        self.workdir = Path(self.workdir).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.started_at = time.monotonic()
        self.group = ProcessGroup(self.logs, self.cwd, self.marker, note=self.note)

    # -- processes ---------------------------------------------------------------------
    def env(self, flwr_home: Path | None = None, supernode: bool = False) -> dict[str, str]:
        """The environment of a Flower process of this deployment (a SuperNode also gets the site's secrets)."""
        env = dict(os.environ)
        env.pop(SPLIT_KEY_ENV, None)
        env.pop(DEDUP_SALT_ENV, None)
        if supernode:
            # Environment, not --node-config: argv is readable by every user through ps.
            env[SPLIT_KEY_ENV] = self.split_key
            env[DEDUP_SALT_ENV] = self.dedup_salt
            if self.sites_dir is not None:
                env["GRAFTFL_SITES_DIR"] = str(self.sites_dir)
        # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name: same venv first.
        env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
        env.update({
            "FLWR_HOME": str(flwr_home or self.flwr_home),
            MARKER_ENV: self.marker,
            "FLWR_TELEMETRY_ENABLED": "0",  # offline machines: no telemetry, no update check
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        })
        # One machine runs the ServerApp and every ClientApp at once: share its cores among them
        # instead of letting each torch process spin one thread per core (unless the caller chose).
        env.setdefault("OMP_NUM_THREADS", str(self.threads_per_process()))
        env.setdefault(TASK_POLL_ENV, TASK_POLL_S)  # how often a SuperExec asks for a task (Flower's default: 1 s)
        return env

    def threads_per_process(self) -> int:
        """Cores per co-located torch process: the ServerApp and one ClientApp per SuperNode."""
        return max(1, (os.cpu_count() or 1) // (self.num_nodes + 1))

    def start(self, name: str, args: list[str], flwr_home: Path | None = None, pipe: bool = False,
              supernode: bool = False) -> ManagedProcess:
        """Start ``args`` in a new session, output to ``logs/<name>.log`` (or a pipe we read)."""
        return self.group.start(name, args, self.env(flwr_home, supernode), pipe=pipe)

    def run_cli(self, name: str, args: list[str], timeout: float = 60.0) -> str:
        """A short ``flwr`` CLI command against our connection; its output, or an error with it."""
        return self.group.run(name, args, self.env(), timeout)

    @property
    def processes(self) -> list[ManagedProcess]:
        """Every process started so far, in start order."""
        return self.group.processes

    def log_report(self) -> str:
        """The tail of every log of this deployment, for an error message."""
        return self.group.log_report()

    def stop(self) -> list[int]:
        """Stop every process of this deployment; returns the pids that would not die (should be empty)."""
        return self.group.stop()

    # -- the deployment ----------------------------------------------------------------
    def note(self, text: str) -> None:
        """A progress line on stderr (stdout carries the run's own output and the final ``run:`` line)."""
        print(f"[deploy-local +{time.monotonic() - self.started_at:.1f}s] {text}", file=sys.stderr, flush=True)

    def tls_args(self, client: bool) -> list[str]:
        """The TLS arguments of a Flower command: the client's root certificate or the server's certificate and key."""
        if not self.tls_files:
            return ["--insecure"]
        if client:
            return ["--root-certificates", str(self.tls_files.ca_cert)]
        return ["--ssl-ca-certfile", str(self.tls_files.ca_cert), "--ssl-certfile", str(self.tls_files.server_cert),
                "--ssl-keyfile", str(self.tls_files.server_key)]

    def start_superlink(self) -> ManagedProcess:
        """Start the SuperLink on a free loopback port (with fresh TLS files when asked); returns its process."""
        if self.tls:
            self.tls_files = generate_tls_files(self.workdir / "tls")
        (self.port,) = free_loopback_ports(1)
        write_flower_config(self.flwr_home, self.port, self.tls_files.ca_cert if self.tls_files else None)
        args = [flower_binary("flower-superlink"), "--port", str(self.port), "--database", str(self.workdir / "superlink.db"),
                "--disable-runtime-dependency-installation", *self.tls_args(client=False)]
        if self.auth:
            args.append("--enable-supernode-auth")
        superlink = self.start("superlink", args)
        self.group.wait_until(f"the SuperLink on port {self.port}", lambda: port_accepts(self.port), [superlink], READY_TIMEOUT_S)
        self.note(f"SuperLink up on 127.0.0.1:{self.port} ({'TLS' if self.tls else 'insecure'}"
                  f"{', SuperNode auth' if self.auth else ''}); workdir {self.workdir}")
        return superlink

    def register_node_keys(self) -> list[Path]:
        """One key pair per SuperNode, public keys registered at the SuperLink (before the nodes start)."""
        private_keys = []
        for index in range(self.num_nodes):
            keys = generate_node_auth_keys(self.workdir / "node-keys", f"supernode-{index}")
            self.run_cli(f"register-{index}", [flower_binary("flwr"), "supernode", "register", str(keys.public_key), CONNECTION])
            private_keys.append(keys.private_key)
        self.note(f"registered {self.num_nodes} SuperNode public keys")
        return private_keys

    def start_supernodes(self, private_keys: list[Path] | None = None) -> list[ManagedProcess]:
        """Start one SuperNode per site, each with its partition in node-config; returns their processes."""
        ports = free_loopback_ports(self.num_nodes)
        nodes = []
        for index, port in enumerate(ports):
            args = [flower_binary("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(port),
                    "--node-config", self.node_config(index), *self.tls_args(client=True), *supernode_isolation_args(self.isolation)]
            if private_keys:
                args += ["--auth-supernode-private-key", str(private_keys[index])]
            # Each SuperNode has its own FLWR_HOME, as on separate machines (no shared app cache).
            home = self.workdir / f"supernode-{index}"
            nodes.append(self.start(f"supernode-{index}", args, flwr_home=home, supernode=True))
            superexec = superexec_args(self.isolation, port)
            if superexec:  # --isolation process: the SuperNode's ClientApps are started by a SuperExec of ours
                self.start(f"superexec-{index}", superexec, flwr_home=home, supernode=True)
        self.group.wait_until(f"{self.num_nodes} SuperNodes online at the SuperLink", self.all_nodes_online,
                        [*self.processes], READY_TIMEOUT_S)
        self.note(f"{self.num_nodes} SuperNodes online")
        return nodes

    def node_config(self, index: int) -> str:
        """SuperNode ``index``'s ``--node-config``: its partition and, with ``data_dir``, its own data folder."""
        config = f"partition-id={index} num-partitions={self.num_nodes}"
        if self.data_dir is not None:  # a site's own fact, as on a hospital's machine: the run config names no data location
            config += f" {DATA_PATH_KEY}={toml_string(str(Path(self.data_dir).resolve() / f'site-{index}'))}"
        return config

    def all_nodes_online(self) -> bool:
        """Every SuperNode has activated at the SuperLink (it logs its node id only after that)."""
        nodes = [p for p in self.processes if p.name.startswith("supernode-")]
        return all(ACTIVATED_LINE in tail(node.log, lines=200) for node in nodes)

    def run_app(self, overrides: str, timeout: float | None = None, project: Path | None = None) -> None:
        """``flwr run <project> <connection> --stream`` with the overrides; returns when the run ends.

        ``project`` is graftfl's checkout unless given (a benchmark submits a Flower app of its own).
        """
        run_config = write_run_config(self.workdir / "run-config.toml", overrides)
        args = [flower_binary("flwr"), "run", str(project or project_root()), CONNECTION, "--stream", "--run-config", str(run_config)]
        flwr_run = self.start("flwr-run", args, pipe=True)
        copier = threading.Thread(target=self._copy_output, args=(flwr_run,), daemon=True)
        copier.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while flwr_run.alive:
            for process in self.processes:
                if process is not flwr_run and not process.alive:
                    raise DeploymentError(f"{process.name} exited ({process.popen.returncode}) during the run" + self.log_report())
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(f"the run did not finish in {timeout:.0f}s" + self.log_report())
            time.sleep(0.5)
        copier.join(timeout=5)
        self.note(f"flwr run finished (exit {flwr_run.popen.returncode})")
        if flwr_run.popen.returncode != 0:
            raise DeploymentError(f"flwr run exited {flwr_run.popen.returncode}" + self.log_report())

    def _copy_output(self, process: ManagedProcess) -> None:
        """Write ``flwr run --stream`` output to its log and, when asked, to ``echo``."""
        with open(process.log, "ab") as log:
            for line in iter(process.popen.stdout.readline, b""):
                log.write(line)
                log.flush()
                if self.echo is not None:
                    self.echo.write(line.decode(errors="replace"))
                    self.echo.flush()


def _raise_system_exit(signum, frame):  # SIGTERM -> unwind through `finally` and stop everything
    raise SystemExit(128 + signum)


def deploy_local(cfg: DictConfig, overrides: list[str], tls: bool = False, auth: bool = False,
                 timeout: float | None = None, keep_workdir: bool = False, data_dir: str | os.PathLike | None = None,
                 isolation: str = DEFAULT_ISOLATION) -> Path:
    """Run ``cfg`` on a fresh local Flower deployment; return the run directory.

    Parameters
    ----------
    cfg : DictConfig
        The composed config (``num_clients`` SuperNodes are started; ``run_id`` is chosen here).
    overrides : list of str
        The Hydra overrides from the command line; the ServerApp composes the same config from them.
    tls, auth : bool
        TLS with a throwaway CA; SuperNode authentication with generated keys (implies TLS).
    timeout : float, optional
        Give up on the run after this many seconds (default: wait until it ends or Ctrl-C).
    keep_workdir : bool
        Keep the temporary directory (logs, certificates) after a successful or interrupted
        run; after a failure it is always kept and its path printed.
    data_dir : path, optional
        ``--data-dir sites/``: SuperNode *i* gets node-config ``data-path=<data_dir>/site-<i>``
        (``graftfl prepare-sites`` writes that layout); the run config names no data location.
    isolation : str
        How ClientApp processes start: ``warm`` (default; forked from a preloaded SuperExec,
        :mod:`graftfl.deploy.warm_superexec`), ``subprocess`` or ``process`` (Flower's ``flwr-clientapp``).
    """
    if not (project_root() / "pyproject.toml").is_file():
        raise DeploymentError(f"deploy-local submits the app from a graftfl checkout, but {project_root()} has no "
                              "pyproject.toml (run it from a clone of the repository)")
    tls = tls or auth
    cfg = with_run_id(cfg)
    run_dir = run_dir_of(cfg)
    workdir = Path(tempfile.mkdtemp(prefix="graftfl-deploy-"))
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DeploymentError(f"--data-dir {data_dir} is not a folder (expected site-0/, site-1/, ... as graftfl prepare-sites writes)")
    deployment = LocalDeployment(workdir, num_nodes=int(cfg.num_clients), tls=tls, auth=auth, echo=sys.stdout,
                                 sites_dir=(run_dir / "sites").resolve(), data_dir=Path(data_dir).resolve() if data_dir else None,
                                 isolation=isolation)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handlers = {}
    if in_main_thread:
        previous_handlers = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_system_exit),
                             signal.SIGINT: signal.getsignal(signal.SIGINT)}
    succeeded = interrupted = False
    started = time.time()
    try:
        deployment.start_superlink()
        private_keys = deployment.register_node_keys() if auth else None
        deployment.start_supernodes(private_keys)
        extra = tls_overrides(deployment.tls_files) if deployment.tls_files else []
        deployment.run_app(run_config_overrides(list(overrides), cfg.run_id, Path(cfg.output_dir).resolve(), extra), timeout)
        summary = run_dir / "summary.json"
        if not summary.exists() or summary.stat().st_mtime < started - 1:  # resume: an old summary does not count
            raise DeploymentError(f"the run ended without {run_dir}/summary.json (the ServerApp failed: see flwr-run.log below)"
                                  + deployment.log_report())
        succeeded = True
    except (KeyboardInterrupt, SystemExit):
        interrupted = True
        raise
    finally:
        if in_main_thread:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            survivors = deployment.stop()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        if survivors:
            print(f"graftfl: could not stop processes {survivors} of the deployment", file=sys.stderr)
        if (succeeded or interrupted) and not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not succeeded:  # a failure: keep the logs to read
            print(f"graftfl: deployment logs kept in {deployment.logs}", file=sys.stderr)
    return run_dir
