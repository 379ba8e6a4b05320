"""Limits on the data plane's open streams, so idle or unauthenticated ones cannot starve the turns.

The gRPC server is synchronous: every open stream holds one thread while it waits
for frames. :class:`StreamGuard` keeps two bounds on that:

- a stream with no frame for ``idle_timeout_s`` is cancelled (a watchdog thread
  checks a few times per timeout), whether or not it ever presented a token;
- at most ``max_pending_streams`` streams may wait for their first frame with a
  live token; one more evicts (cancels) the oldest of them.

The server sizes its thread pool to ``max_pending_streams`` plus the threads for
turns, so an admitted stream never queues behind idle ones.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class GuardedStream:
    """One open gRPC stream: its context, the peer, when it last sent or got a frame, its turn once known."""

    context: object
    peer: str
    last_activity: float = field(default_factory=time.monotonic)
    turn: object | None = None  # the Turn whose live token it presented (None: still pending)
    closed_idle: bool = False


class StreamGuard:
    """Idle timeout and pending-stream cap for a gRPC server's streams.

    Parameters
    ----------
    idle_timeout_s : float
        A stream with no frame for this long is cancelled.
    max_pending_streams : int
        Streams without a turn allowed at once; one more evicts the oldest.
    """

    def __init__(self, idle_timeout_s: float = 60.0, max_pending_streams: int = 32):
        if float(idle_timeout_s) <= 0 or int(max_pending_streams) < 1:
            raise ValueError(f"idle_timeout_s must be > 0 and max_pending_streams >= 1, got {idle_timeout_s} and {max_pending_streams}")
        self.idle_timeout_s, self.max_pending_streams = float(idle_timeout_s), int(max_pending_streams)
        self._lock = threading.Lock()
        self._streams: list[GuardedStream] = []
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_idle, name="graftfl-data-plane-idle", daemon=True)

    def start(self) -> None:
        """Start the watchdog thread that cancels idle streams."""
        self._watchdog.start()

    def stop(self) -> None:
        """Ask the watchdog thread to stop."""
        self._stopping.set()

    def admit(self, context) -> GuardedStream:
        """Register a new stream; beyond ``max_pending_streams`` pending ones, cancel the oldest."""
        stream = GuardedStream(context, str(context.peer()))
        with self._lock:
            pending = [s for s in self._streams if s.turn is None]
            evicted = pending[: max(0, len(pending) - self.max_pending_streams + 1)]
            for old in evicted:
                self._streams.remove(old)
            self._streams.append(stream)
        for old in evicted:
            log.warning("data plane: %d streams without a token frame; evicting the oldest (peer %s)", self.max_pending_streams, old.peer)
            old.context.cancel()
        return stream

    def release(self, stream: GuardedStream) -> None:
        """Forget ``stream`` (it has ended)."""
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def count(self) -> int:
        """Streams currently open."""
        with self._lock:
            return len(self._streams)

    def _watch_idle(self) -> None:
        while not self._stopping.wait(min(1.0, self.idle_timeout_s / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._streams if now - s.last_activity > self.idle_timeout_s]
                for stream in idle:
                    self._streams.remove(stream)
                    stream.closed_idle = True
            for stream in idle:
                label = getattr(stream.turn, "label", None) or "none: no token frame"
                log.warning("data plane: closing a stream idle for %.0f s (peer %s, turn %s)", now - stream.last_activity, stream.peer, label)
                stream.context.cancel()
