"""Frames between a site and a data plane server of the same process, handed over in memory.

The in-process simulation backend (``sim.backend=inprocess``) runs the sites' ClientApp in the
ServerApp's process and thread. Over gRPC every split batch then went from that thread to a
gRPC handler thread of the same process and back: about 1.7 ms a batch on 2 cores, as much
as the bottom's whole step. A server started with ``direct=True`` also registers here under
its advertised address, and a :class:`~graftfl.transport.client.DataPlaneClient` of this
process that dials that address sends its frames through a :class:`DirectStream`: the server
serves each one in the caller's thread (:meth:`DataPlaneServer.serve_direct`).

What a site sends and what the server checks do not change: the same frames, the token and
turn checks, the frame kinds and counts, the tensor checks and the byte counts. Only gRPC is
left out, and with it the bytes: a frame crosses as its receiver would parse it
(:func:`~graftfl.transport.frames.as_delivered`: the header, copies of the tensors at the wire
dtype, the encoded size), which saves encoding and decoding both ways (about 0.17 ms of a
2.3 ms LeNet split step). A TLS data plane, or
a client given a CA, still goes through gRPC, so that the certificate is checked as between
processes. A site in another process (Ray workers, a deployment) reaches the server over gRPC.
"""

from __future__ import annotations

import threading

import grpc

from graftfl.transport.checks import FrameRejected

_SERVERS: dict[str, object] = {}  # advertised address -> DataPlaneServer started with direct=True
_LOCK = threading.Lock()


def register(address: str, server) -> None:
    """Serve ``server``'s clients of this process directly; a second server at the same address is a ``ValueError``."""
    with _LOCK:
        if _SERVERS.get(address, server) is not server:
            raise ValueError(f"another data plane of this process is already served directly at {address}")
        _SERVERS[address] = server


def unregister(address: str, server) -> None:
    """Stop serving ``server`` directly (its clients of this process would then dial gRPC)."""
    with _LOCK:
        if _SERVERS.get(address) is server:
            del _SERVERS[address]


def server_at(address: str):
    """The data plane of this process served directly at ``address``, or None."""
    with _LOCK:
        return _SERVERS.get(address)


class DirectStream:
    """One turn's stream between a site and a data plane server of this process.

    The site calls :meth:`send`; the server keeps the stream as the turn's (``turn.stream``) and
    may :meth:`cancel` it. As a gRPC stream that was aborted, ended or cancelled, a stream that
    had a frame rejected, sent ``end`` or was cancelled refuses every later frame.

    Parameters
    ----------
    server : DataPlaneServer
        The server (found with :func:`server_at`).
    """

    def __init__(self, server):
        self.server = server
        self.turn = None  # the server's Turn once a frame presented its token
        self._closed: FrameRejected | None = None

    def send(self, raw: bytes) -> bytes | None:
        """The server's reply to the frame ``raw`` (``None`` for ``end``); :class:`FrameRejected` if refused."""
        return self._served(lambda: self.server.serve_direct(self, raw), lambda reply: reply is None)

    def exchange(self, frame, float_dtype: str) -> tuple[object | None, int, int]:
        """:meth:`send` for a frame not yet encoded: ``(reply frame, size up, size down)``, as
        :meth:`DataPlaneServer.serve_direct_frame` answers; :class:`FrameRejected` if refused."""
        return self._served(lambda: self.server.serve_direct_frame(self, frame, float_dtype), lambda answer: answer[0] is None)

    def _served(self, serve, ended):
        """``serve()``'s answer; a refused frame, or an answer that ``ended`` the stream, closes the stream."""
        if self._closed is not None:
            raise self._closed
        try:
            answer = serve()
        except FrameRejected as rejected:
            self._closed = rejected
            raise
        if ended(answer):
            self._closed = FrameRejected(grpc.StatusCode.CANCELLED, "the stream has ended")
        return answer

    def cancel(self) -> None:
        """Refuse every later frame (the server closed the turn, or the site gave it up)."""
        if self._closed is None:
            self._closed = FrameRejected(grpc.StatusCode.CANCELLED, "the turn was closed")

    def peer(self) -> str:
        """Where the frames come from, for the server's logs."""
        return "in-process"
