"""A client's turn on the data plane: its one-time token, what it may send, and its counters."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc

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

    def admit(self, kind: str, size: int, max_frame_bytes: int) -> bool:
        """Count a frame of ``kind`` and ``size`` bytes against this turn's limits (:class:`FrameRejected` beyond
        them); False for ``end``, which ends the turn cleanly."""
        self.bytes_up += size
        self.frames += 1
        self.last_frame_at = time.monotonic()
        if self.first_frame_at is None:
            self.first_frame_at = self.last_frame_at
        if size > max_frame_bytes:
            raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, f"frame of {size} bytes exceeds the limit of {max_frame_bytes} bytes")
        if kind == "end":
            self.ended_cleanly = True
            return False
        if self.accept is not None and kind not in self.accept:
            raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, f"frame kind '{kind}' is not accepted in this turn (it accepts {sorted(self.accept)})")
        self.kind_counts[kind] = self.kind_counts.get(kind, 0) + 1
        if self.max_batches is not None and self.kind_counts[kind] > self.max_batches:
            raise FrameRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"more '{kind}' frames than the turn's {self.max_batches} batches")
        return True

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
