"""``graftfl sim`` on an existing Ray cluster: Flower's simulation across several machines.

Flower's simulation runs each virtual SuperNode's ClientApp in a Ray actor. Without an
address, Flower starts a private Ray instance on this machine for the run. With one
(``sim.ray_address`` in the config, or ``graftfl sim --ray-address``), the driver
*connects* to a cluster started beforehand with ``ray start --head`` on one machine and
``ray start --address <head>:<port>`` on the others, and Ray places the actors on all of
them.

A cluster started earlier does not inherit this process's environment, so what the
ClientApps read from theirs travels in the job's ``runtime_env``: ``PYTHONPATH`` (this
checkout first, as Flower does for its own Ray instance) and every ``GRAFTFL_*``
variable ``graftfl sim`` sets for the sites (the split relay key, the dedup salt, the
sites' folders). They are visible to whoever administers the cluster (the Ray job's
config holds them): attach only to a cluster the sites trust with their secrets.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

logger = logging.getLogger(__name__)

ENV_PREFIX = "GRAFTFL_"  # the sites' environment in simulation (keys, salts, data folders, consents)


def ray_address_of(cfg, override: str | None = None) -> str | None:
    """The Ray cluster to attach to: ``override`` (``--ray-address``), else ``cfg.sim.ray_address``, else ``None``.

    ``None`` (or an empty string) means Flower starts its own Ray instance for the run.
    """
    if override:
        return str(override)
    address = (cfg.get("sim") or {}).get("ray_address")
    return str(address) if address else None


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables the ClientApps on a pre-started cluster need from this driver.

    ``PYTHONPATH`` is this interpreter's ``sys.path`` followed by the caller's ``PYTHONPATH``
    (what Flower gives its own Ray instance), so workers import the same graftfl; every
    ``GRAFTFL_*`` variable is passed as it is.
    """
    environ = dict(os.environ if environ is None else environ)
    paths = [entry for entry in sys.path if entry]
    if environ.get("PYTHONPATH"):
        paths.append(environ["PYTHONPATH"])
    env = {name: value for name, value in environ.items() if name.startswith(ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def backend_config(cfg, ray_address: str | None = None) -> dict:
    """Flower's simulation ``backend_config`` for ``cfg`` (per-client resources, Ray's init arguments).

    With ``ray_address`` the init arguments name the cluster (Ray's ``address``), so that
    Ray connects instead of starting a local instance.
    """
    init_args = {"include_dashboard": False, "log_to_driver": True}
    if ray_address:
        init_args["address"] = ray_address
    return {
        "client_resources": {"num_cpus": cfg.client_resources.num_cpus, "num_gpus": cfg.client_resources.num_gpus},
        "init_args": init_args,
    }


def reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether ``host:port`` accepts TCP connections (``auto`` and ``ray://`` addresses are left to Ray)."""
    if address == "auto" or "://" in address:
        return True
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def attach(address: str, environ: dict[str, str] | None = None) -> None:
    """Connect this driver to the Ray cluster at ``address`` with the sites' environment in its ``runtime_env``.

    Flower's Ray backend initialises Ray only when it is not yet connected, so connecting
    here first is how the job's ``runtime_env`` carries more than Flower's ``PYTHONPATH``.
    Flower disconnects (``ray.shutdown()``, which leaves the cluster running) when the
    simulation ends; call :func:`detach` in a ``finally`` as well, for a run that failed early.

    Raises
    ------
    ConfigError
        No Ray cluster answers at ``address``.
    """
    import ray

    from graftfl.config import ConfigError

    # Ray retries an address where nothing listens for minutes; say so at once instead.
    if not reachable(address):
        raise ConfigError(f"sim.ray_address={address!r}: no Ray cluster answers there (expected host:port of a head "
                          "started with `ray start --head --port <port>`, or \"auto\"; null starts a local one)")
    env = worker_env(environ)
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=True)
    except ConnectionError as err:
        raise ConfigError(f"sim.ray_address={address!r}: no Ray cluster answers there (start one with "
                          f"`ray start --head --port <port>`, or leave it null to start a local one): {err}") from err
    resources = ray.cluster_resources()
    logger.info("attached to the Ray cluster at %s: %d node(s), %s CPUs, %s GPUs", address, len(ray.nodes()),
                resources.get("CPU", 0), resources.get("GPU", 0))


def start_local(backend_config: dict, attempts: int = 3) -> None:
    """Start this run's local Ray instance as Flower's Ray backend would, retrying a start that timed out.

    On a loaded machine Ray's own start sometimes times out: waiting for its GCS server
    (``RuntimeError`` "Timed out waiting for file ... gcs_server_port") or for the node
    (``Exception`` "The current node timed out during startup"); either ended the whole
    simulation. Only those are retried.
    Flower's backend initialises Ray only when it is not yet running, so starting it here,
    with the same arguments and the same ``PYTHONPATH`` for the workers, changes nothing else.
    """
    import ray

    init_args = {"include_dashboard": False, **backend_config.get("init_args", {})}
    # what Flower's RayBackend.init_ray does: the workers get this driver's sys.path too
    pythonpath = os.pathsep.join(filter(None, [os.pathsep.join(sys.path), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as err:  # Ray raises the node's start timeout as a bare Exception
            if "timed out" not in str(err).lower() or attempt == attempts:
                raise
            logger.warning("Ray did not start (%s); retrying (%d of %d)", err, attempt + 1, attempts)
            ray.shutdown()


def detach() -> None:
    """Disconnect from the cluster if still connected (the cluster itself keeps running)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
