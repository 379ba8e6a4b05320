"""Where a deployment's programs and ports come from: Flower's binaries beside this interpreter, free loopback ports."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

from graftfl.deploy.supervise import DeploymentError


def flower_binary(name: str) -> str:
    """``name`` from the environment of the running interpreter (same venv, same flwr)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"'{name}' not found beside {sys.executable} or on PATH; install flwr==1.41.0")
    return found


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 (held together while chosen, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
