"""Shared test helpers: run the real `graftfl` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_graftfl(*args: str, cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m graftfl.cli ARGS`` from ``cwd`` with this checkout on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "graftfl.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"graftfl {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_dir_from(proc: subprocess.CompletedProcess, cwd: Path) -> Path:
    """The run directory named on the last stdout line (the output contract)."""
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run: "), f"last stdout line is not 'run: ...': {last!r}"
    return cwd / last.removeprefix("run: ")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and the machine's cores are shared (attack and defence tests)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """Standardised digits for the attack and defence tests: site records, the attacker's disjoint auxiliary data, held-out records."""
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(bunch.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return {"x": x, "y": y, "site": order[:600], "aux": order[600:1200], "held": order[1200:], "range": float(x.max() - x.min())}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def _current(identity: str) -> int | None:
    """A TaskIdentity value through its public property (``None`` when no task is set)."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        return getattr(TaskIdentity, identity)
    except RuntimeError:
        return None


@contextmanager
def flower_task_identity(run_id: int = 1):
    """Flower builds messages only inside a task (a real ServerApp sets one): set one for the test.

    Only TaskIdentity's public setters are used, as Flower's own runtimes do.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = {name: _current(name) for name in ("task_id", "run_id", "node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


def pytest_collection_modifyitems(config, items):
    """Modules with the most slow tests first (each keeps its order; the rest follow as collected).

    ``make test`` hands whole files to parallel workers in this order (``--dist loadfile
    --no-loadscope-reorder``): the long files (deployments, simulations) start at once and the
    many quick files fill the gaps, instead of one long file starting last and running alone.
    """
    slow_per_module: dict[str, int] = {}
    for item in items:
        slow_per_module[item.nodeid.split("::")[0]] = slow_per_module.get(item.nodeid.split("::")[0], 0) + ("slow" in item.keywords)
    items.sort(key=lambda item: -slow_per_module[item.nodeid.split("::")[0]])  # stable: file and test order kept otherwise
