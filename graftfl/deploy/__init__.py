"""``graftfl deploy-local`` and what it is made of.

- :mod:`.supervise` — start processes with a marker, watch them, stop every one of
  them and their descendants (tests use it to find what a deployment left behind);
- :mod:`.flower_files` — ``$FLWR_HOME/config.toml``, the run-config file, TLS overrides;
- :mod:`.processes` — Flower's binaries beside this interpreter, free loopback ports;
- :mod:`.isolation` — how ClientApp processes start (Flower's ``subprocess``/``process`` modes, graftfl's ``warm``);
- :mod:`.warm_superexec` — the SuperExec that forks ClientApp processes from a preloaded one;
- :mod:`.local` — the local deployment itself (:func:`deploy_local`).
"""

from graftfl.deploy.local import LocalDeployment, deploy_local
from graftfl.deploy.supervise import DeploymentError

__all__ = ["DeploymentError", "LocalDeployment", "deploy_local"]
