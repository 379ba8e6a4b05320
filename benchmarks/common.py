"""Shared helpers for benchmarks: run a command while sampling the process tree's memory."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(), "platform": platform.platform()}


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of ``process`` and all its descendants (Ray workers included)."""
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(args: list[str], cwd: Path, timeout: float = 3600) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run ``args``; return the completed process, the peak process-tree RSS and wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    popen = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(popen.pid)
        while not stop.is_set():
            try:
                peak = max(peak, tree_rss(root))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = popen.communicate(timeout=timeout)
    stop.set()
    sampler.join()
    proc = subprocess.CompletedProcess(args, popen.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{stderr[-4000:]}")
    return proc, peak, time.monotonic() - started


def write_results(name: str, payload: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    print(table)


class CallClock:
    """Seconds spent inside the given functions (``(owner, attribute)`` pairs) while the ``with`` block runs."""

    def __init__(self, *targets):
        self.targets, self.seconds, self._originals = targets, 0.0, []

    def __enter__(self) -> "CallClock":
        for owner, name in self.targets:
            original = getattr(owner, name)
            self._originals.append((owner, name, original))
            setattr(owner, name, self._timed(original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._originals:
            setattr(owner, name, original)
        self._originals.clear()

    def _timed(self, original):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def merge_with_existing(name: str, payload: dict, key) -> dict:
    """``payload``'s ``results`` and ``failures`` added to those of RESULTS/<name>.json, replacing the rows
    measured again (same ``key(row)``); ``commands`` and the load averages are concatenated."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return payload
    old = json.loads(path.read_text())
    measured = {key(row) for row in payload["results"] + payload["failures"]}
    keep = lambda rows: [row for row in rows if key(row) not in measured]  # noqa: E731
    commands = old.get("commands", [old["command"]] if "command" in old else [])
    return {**payload, "commands": commands + payload["commands"], "results": keep(old["results"]) + payload["results"],
            "failures": keep(old["failures"]) + payload["failures"], "notes": old.get("notes", []) + payload.get("notes", []),
            "load_average_1min_before_after": old["load_average_1min_before_after"] + payload["load_average_1min_before_after"]}


def graftfl_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "graftfl.cli", "sim", *overrides]
