"""A client's turn on the data plane: its one-time token, what it may send, and its counters."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from graftfl.transport.checks import FrameRejected

log = logging.getLogger("graftfl.transport.server")  # where the server's rejections were always logged


@dataclass
class Turn:
    """One client turn on the data plane: its token, counters and the stage's per-turn state."""

    token: str
    label: str
    state: dict = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    frames: int = 0
    open: bool = True
    attached: bool = False
    ended_cleanly: bool = False
    error: str | None = None
    first_frame_at: float | None = None
    last_frame_at: float = field(default_factory=time.monotonic)
    stream: object | None = None  # the gRPC context of the attached stream (cancelled when the turn closes)
    accept: frozenset[str] | None = None  # frame kinds this turn accepts (None: whatever the stage expects)
    max_batches: int | None = None  # most frames of any one kind (None: no cap)
    kind_counts: dict = field(default_factory=dict)

    def frames_per_second(self) -> float | None:
        """Frames served per second between the turn's first and last frame (the data plane's pace)."""
        if self.first_frame_at is None or self.frames < 3:
            return None
        return (self.frames - 1) / max(self.last_frame_at - self.first_frame_at, 1e-9)


def note_rejected(turn: Turn | None, reject: FrameRejected, peer: str) -> None:
    """Record a refused frame on its turn (the turn's error) and in the server's log."""
    if turn is not None:
        turn.error = f"{reject.code.name}: {reject.message}"
    log.warning("data plane rejected a frame from %s (%s): %s", peer, reject.code.name, reject.message)
