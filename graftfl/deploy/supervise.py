"""Process supervision: start processes, watch them, and stop every one of them and their descendants.

Each process we start leads its own session and carries a marker in its environment
(``MARKER_ENV=<marker>``), which every process it starts inherits. Flower detaches
some of its children into sessions of their own (``flower-superexec``,
``flwr-serverapp``, ``flwr-clientapp``); the marker still finds them in ``/proc``
(:func:`processes_with_env`), so :meth:`ProcessGroup.stop` leaves nothing behind.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER_ENV = "GRAFTFL_DEPLOYMENT"  # inherited by every process of one deployment
LOG_TAIL_LINES = 40
STOP_GRACE_S = 5.0


class DeploymentError(RuntimeError):
    """The local deployment failed; the message carries the tail of the relevant logs."""


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (or a note that there is none)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


@dataclass
class ManagedProcess:
    """One process we started, its own session leader, logging to ``log``."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def signal_group(self, signum: int) -> None:
        """Signal the process group we lead; only while unreaped, so the group id is still ours."""
        if not self.alive:
            return  # its group's stragglers carry the deployment marker and are signalled by pid
        try:
            os.killpg(self.popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """pid -> command line of the live processes whose environment holds ``name=value`` (Linux ``/proc``).

    Processes of other users (unreadable environment) and processes that exit while
    being read are skipped; without ``/proc`` the answer is empty.
    """
    needle = f"{name}={value}".encode()
    found: dict[int, str] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:  # gone, or not ours
            continue
        try:
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited just now: still reported, its pid may yet need a signal
            found[int(entry.name)] = ""
    return found


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries ``MARKER_ENV=marker`` (Linux ``/proc``)."""
    return list(processes_with_env(MARKER_ENV, marker))


def signal_pids(pids: list[int], signum: int) -> None:
    """Send ``signum`` to each pid; pids that are gone or not ours are skipped."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class ProcessGroup:
    """The processes of one deployment: started with a marker, watched, stopped together.

    Parameters
    ----------
    logs : Path
        Folder of the ``<name>.log`` files (created).
    cwd : Path
        Working directory of every process.
    marker : str, optional
        The value of ``MARKER_ENV`` every process carries (default: a fresh random one).
    note : callable, optional
        Receives progress lines (how many processes were stopped, and how fast).
    """

    def __init__(self, logs: Path, cwd: Path, marker: str | None = None, note: Callable[[str], None] | None = None):
        self.logs, self.cwd = Path(logs), Path(cwd)
        self.marker = marker or uuid.uuid4().hex
        self.note = note or (lambda text: None)
        self.processes: list[ManagedProcess] = []
        self.logs.mkdir(parents=True, exist_ok=True)

    def marked(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` plus this group's marker."""
        return {**env, MARKER_ENV: self.marker}

    def start(self, name: str, args: list[str], env: dict[str, str], pipe: bool = False) -> ManagedProcess:
        """Start ``args`` in a new session, output to ``logs/<name>.log`` (or a pipe the caller reads)."""
        log = self.logs / f"{name}.log"
        log_file = open(log, "ab")
        popen = subprocess.Popen(
            args, cwd=self.cwd, env=self.marked(env), start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else log_file, stderr=subprocess.STDOUT,
        )
        log_file.close()
        process = ManagedProcess(name, popen, log)
        self.processes.append(process)
        return process

    def run(self, name: str, args: list[str], env: dict[str, str], timeout: float = 60.0) -> str:
        """A short command run to its end; its output, or a :class:`DeploymentError` with it."""
        try:
            done = subprocess.run(args, cwd=self.cwd, env=self.marked(env), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"{name} did not finish in {timeout:.0f}s: {shlex.join(args)}") from err
        (self.logs / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise DeploymentError(f"{name} failed (exit {done.returncode}): {shlex.join(args)}\n{done.stdout}{done.stderr}"
                                  + self.log_report())
        return done.stdout

    def wait_until(self, what: str, ready: Callable[[], bool], watched: list[ManagedProcess], timeout: float) -> None:
        """Poll ``ready`` until true; fail early when a watched process dies, or at ``timeout``."""
        deadline = time.monotonic() + timeout
        while not ready():
            for process in watched:
                if not process.alive:
                    raise DeploymentError(f"{process.name} exited ({process.popen.returncode}) while waiting for {what}"
                                          + self.log_report())
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out after {timeout:.0f}s waiting for {what}" + self.log_report())
            time.sleep(0.2)

    def log_report(self) -> str:
        """The tail of every log, for an error message."""
        parts = [f"\n--- {log.name} (last {LOG_TAIL_LINES} lines) ---\n{tail(log)}" for log in sorted(self.logs.glob("*.log"))]
        return "\n" + "".join(parts) + f"\n(all logs: {self.logs})"

    def stop(self) -> list[int]:
        """Stop every process of this group; returns the pids that would not die (should be empty)."""
        stopping_at = time.monotonic()
        count = len(set(marked_pids(self.marker)) | {p.popen.pid for p in self.processes if p.alive})
        for process in reversed(self.processes):
            process.signal_group(signal.SIGTERM)
        signal_pids(marked_pids(self.marker), signal.SIGTERM)
        if not self._wait_all_gone(STOP_GRACE_S):
            for process in self.processes:
                process.signal_group(signal.SIGKILL)
            signal_pids(marked_pids(self.marker), signal.SIGKILL)
            self._wait_all_gone(STOP_GRACE_S)
        survivors = marked_pids(self.marker)
        self.note(f"stopped {count} processes in {time.monotonic() - stopping_at:.1f}s"
                  + (f"; still alive: {survivors}" if survivors else ""))
        return survivors

    def _wait_all_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            for process in self.processes:
                process.popen.poll()  # reap our direct children (zombies keep no environ, but keep pids)
            if not marked_pids(self.marker) and all(not p.alive for p in self.processes):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
