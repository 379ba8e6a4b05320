"""How a deployment's ClientApp processes are started: Flower's isolation modes and graftfl's warm one.

* ``subprocess`` -- Flower's default: each ``flower-supernode`` starts its own
  ``flower-superexec``, which starts a fresh ``flwr-clientapp`` interpreter per message
  (importing Flower, torch, graftfl and the data libraries every time).
* ``process`` -- ``flower-supernode --isolation process``: the SuperExec is started by us,
  next to the SuperNode, pointed at its Runtime API; still one ``flwr-clientapp`` per message.
* ``warm`` -- ``--isolation process`` with :mod:`graftfl.deploy.warm_superexec` as the
  SuperExec: Flower's SuperExec loop whose ClientApp processes are forked from it after it
  imported everything once. Each message still runs in a process of its own.

Every mode also shortens Flower's SuperExec task poll (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``,
1 s by default, the one polling interval Flower 1.41 lets its user set).
"""

from __future__ import annotations

import sys

from graftfl.deploy.processes import flower_binary

ISOLATIONS = ("warm", "process", "subprocess")
DEFAULT_ISOLATION = "warm"
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
TASK_POLL_S = "0.1"


def check_isolation(isolation: str) -> None:
    """Raise ``ValueError`` naming the valid modes unless ``isolation`` is one of them."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation {isolation!r} is not one of {list(ISOLATIONS)}")


def supernode_isolation_args(isolation: str) -> list[str]:
    """``flower-supernode`` arguments for ``isolation`` (none for Flower's default, ``subprocess``)."""
    check_isolation(isolation)
    return [] if isolation == "subprocess" else ["--isolation", "process"]


def superexec_args(isolation: str, runtime_port: int) -> list[str] | None:
    """The SuperExec command we start beside a SuperNode whose Runtime API is on ``runtime_port``; ``None`` if the SuperNode starts its own.

    The Runtime API is plaintext on loopback, as between a SuperNode and the SuperExec it
    starts itself in ``subprocess`` mode.
    """
    check_isolation(isolation)
    if isolation == "subprocess":
        return None
    program = [sys.executable, "-m", "graftfl.deploy.warm_superexec"] if isolation == "warm" else [flower_binary("flower-superexec")]
    return [*program, "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
