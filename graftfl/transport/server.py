"""The data plane's server: a gRPC bidirectional stream inside the ServerApp process.

One RPC, ``/graftfl.DataPlane/Stream``, moves opaque frames (see
:mod:`graftfl.transport.frames`). The strategy opens a *turn* for one client
(:meth:`DataPlaneServer.open_turn`), which creates a one-time random token; the
client presents it in every frame of one stream; :meth:`DataPlaneServer.close_turn`
revokes it. Every frame is validated before it reaches the model:

- unknown, revoked or reused token -> ``UNAUTHENTICATED``;
- frame over ``max_frame_bytes``, unknown kind, a kind the turn does not accept
  (an evaluation turn takes evaluation frames only), malformed header, wrong
  tensor names, shape or dtype, zero-element tensors, non-finite values, labels
  out of range -> ``INVALID_ARGUMENT``;
- more frames of a kind than the turn's declared batches -> ``RESOURCE_EXHAUSTED``.

Streams cannot starve the turns: a stream that has sent no frame for
``idle_timeout_s`` is cancelled (authenticated or not), and at most
``max_pending_streams`` streams may wait for their first (token-bearing) frame;
one more evicts the oldest. The thread pool has room for all of them plus
``workers`` authenticated streams, so an idle or garbage stream never holds the
thread a turn needs.

A bad frame ends only its own stream; the server keeps serving the others. The
stage (the model part the server holds) is shared by all turns and guarded by a
lock, so a late frame of a stalled client cannot interleave with the next
client's step. The stage's own parameter update runs after its reply has been
sent (``stage.complete_step``), overlapping the client's backward pass; read
the stage's weights from another thread only after :meth:`DataPlaneServer.settle`.

A server started with ``direct=True`` also serves the clients of its own process in memory
(:mod:`graftfl.transport.direct`, the in-process simulation): the same frames and checks,
served in the caller's thread by :meth:`DataPlaneServer.serve_direct_frame` (a frame as its
receiver parses it, no bytes) and :meth:`DataPlaneServer.serve_direct` (an encoded frame).
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from graftfl.core.denormals import flush_denormals
from graftfl.transport import direct
from graftfl.transport.checks import FrameRejected, checked_delivered, validated_tensors
from graftfl.transport.frames import FLOAT_WIRE_DTYPES, Frame, FrameError, as_delivered, encode_frame, parse_header
from graftfl.transport.streams import StreamGuard
from graftfl.transport.turns import Turn, note_rejected

log = logging.getLogger(__name__)

SERVICE_METHOD = "/graftfl.DataPlane/Stream"
GRPC_SLACK_BYTES = 1 << 20


def _identity(data: bytes) -> bytes:
    return data


class DataPlaneServer:
    """gRPC server for per-batch split-learning traffic.

    Parameters
    ----------
    stage : object
        ``TopStage`` or ``MiddleStage`` (:mod:`graftfl.core.split`): gives
        ``input_specs(kind, state)`` and ``handle(kind, tensors, state)``.
    bind_address : str
        ``host:port`` to listen on (port 0 picks a free port).
    advertise_address : str, optional
        ``host:port`` clients are told to dial; default: the bind host and the
        bound port (``127.0.0.1`` when bound to all interfaces).
    wire_dtype : str
        Float dtype every floating tensor must arrive in.
    max_batch : int
        Largest batch a frame may carry.
    max_frame_bytes : int
        Frames above this are rejected with ``INVALID_ARGUMENT``; gRPC itself
        refuses messages above this plus 1 MiB (``RESOURCE_EXHAUSTED``).
    server_cert, server_key : path, optional
        PEM files; both or neither (one without the other is a ``ValueError``,
        never a silent plaintext fallback). With both the stream is TLS only.
    workers : int
        Threads for authenticated streams (turns) on top of the pending ones.
    idle_timeout_s : float
        A stream with no frame for this long is cancelled (its turn fails).
    max_pending_streams : int
        Streams that may wait for their first frame at once; one more evicts the oldest.
    compute_threads : int
        Torch threads the stage computes with, set in every handler thread and for frames
        served in memory. Frames are served one at a time (under the server's lock), so more
        threads only speed up one batch's ops; a fixed count keeps a seeded run's numbers the
        same whichever thread serves a frame, and 1 adds no OpenMP pool to a gRPC handler
        thread (``protocol.plane_threads``, :func:`graftfl.strategies.split_config.stage_threads`).
    flush_denormal : bool
        Denormal floats as zero while the stage computes (the run's ``flush_denormal``), set
        like ``compute_threads``: the flag is per thread and a handler thread may predate it.
    direct : bool
        Also serve this process's clients in memory (:mod:`graftfl.transport.direct`): the
        in-process simulation backend. Clients of other processes use gRPC either way.
    """

    def __init__(self, stage, bind_address: str = "127.0.0.1:0", advertise_address: str | None = None, *, wire_dtype: str = "float32",
                 max_batch: int = 1024, max_frame_bytes: int = 64 << 20, server_cert: str | None = None, server_key: str | None = None, workers: int = 8,
                 idle_timeout_s: float = 60.0, max_pending_streams: int = 32, compute_threads: int = 1, flush_denormal: bool = False,
                 direct: bool = False):
        if wire_dtype not in FLOAT_WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {list(FLOAT_WIRE_DTYPES)}, got '{wire_dtype}'")
        if bool(server_cert) != bool(server_key):
            raise ValueError("data-plane TLS needs both a server certificate and its key (tls.server_cert and tls.server_key); "
                             f"got only the {'certificate' if server_cert else 'key'}")
        self.stage, self.wire_dtype, self.max_batch, self.max_frame_bytes = stage, wire_dtype, int(max_batch), int(max_frame_bytes)
        if int(compute_threads) < 1:
            raise ValueError(f"compute threads must be >= 1, got {compute_threads}")
        self.compute_threads, self.flush_denormal = int(compute_threads), bool(flush_denormal)
        self.direct = bool(direct)
        self.guard = StreamGuard(idle_timeout_s, max_pending_streams)
        self.lock = threading.Lock()
        self.turns: dict[str, Turn] = {}
        threads = max(1, int(workers)) + self.guard.max_pending_streams
        options = [("grpc.max_receive_message_length", self.max_frame_bytes + GRPC_SLACK_BYTES), ("grpc.max_send_message_length", self.max_frame_bytes + GRPC_SLACK_BYTES)]
        # every admitted stream has a thread of its own: beyond that gRPC answers RESOURCE_EXHAUSTED instead of queueing
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options, maximum_concurrent_rpcs=threads)
        handler = grpc.stream_stream_rpc_method_handler(self._stream, request_deserializer=_identity, response_serializer=_identity)
        service, method = SERVICE_METHOD.strip("/").split("/")
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
        self.tls = bool(server_cert and server_key)
        if self.tls:
            credentials = grpc.ssl_server_credentials([(Path(server_key).read_bytes(), Path(server_cert).read_bytes())])
            port = self._server.add_secure_port(bind_address, credentials)
        else:
            port = self._server.add_insecure_port(bind_address)
        if port == 0:
            raise OSError(f"data plane could not bind {bind_address}")
        self.port = port
        self.address = advertise_address or _advertised(bind_address, port)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "DataPlaneServer":
        """Start serving the data plane and its idle-stream guard; returns ``self``."""
        if self.direct:  # first: a clash at this address leaves nothing running
            direct.register(self.address, self)
        self._server.start()
        self.guard.start()
        log.info("data plane listening on %s (advertised %s, tls=%s)", self.port, self.address, self.tls)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop the guard and the gRPC server, letting streams finish for ``grace`` seconds."""
        direct.unregister(self.address, self)
        self.guard.stop()
        self._server.stop(grace).wait()

    def __enter__(self) -> "DataPlaneServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ turns
    def open_turn(self, label: str = "", accept=None, max_batches: int | None = None) -> Turn:
        """A new turn with a fresh one-time token (``secrets.token_urlsafe``).

        Parameters
        ----------
        label : str
            For logs.
        accept : iterable of str, optional
            The frame kinds this turn accepts (e.g. only the evaluation kinds for an
            evaluation turn); others get ``INVALID_ARGUMENT``. ``end`` is always accepted.
        max_batches : int, optional
            The turn's declared batches: more frames than this of any one kind
            get ``RESOURCE_EXHAUSTED``.
        """
        if max_batches is not None and int(max_batches) < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        turn = Turn(token=secrets.token_urlsafe(24), label=label, accept=None if accept is None else frozenset(accept),
                    max_batches=None if max_batches is None else int(max_batches))
        with self.lock:
            self.turns[turn.token] = turn
        return turn

    def close_turn(self, turn: Turn) -> Turn:
        """Revoke the turn's token; a pending half-batch (U-shaped) is dropped, the stage stays as after its last step."""
        with self.lock:
            turn.open = False
            turn.state.pop("pending", None)
            self.stage.complete_step()
            stream = turn.stream
        if stream is not None and not turn.ended_cleanly:
            stream.cancel()  # a stalled client's stream must not hold a server thread forever
        return turn

    def settle(self) -> None:
        """Complete the stage's update of the last reply (a no-op when it is done): call before reading its weights."""
        with self.lock:
            self.stage.complete_step()

    # ------------------------------------------------------------- the stream
    def _stream(self, request_iterator, context):
        turn: Turn | None = None
        stream = self.guard.admit(context)
        try:
            for raw in request_iterator:
                stream.last_activity = time.monotonic()
                if stream.turn is None:  # a live token: no longer pending (eviction) while its first frame is served
                    stream.turn = self._claimed_turn(raw)
                turn, reply = self._serve_frame(raw, turn)
                turn.stream, stream.turn = context, turn
                if reply is None:
                    return
                yield reply
                stream.last_activity = time.monotonic()
                self.settle()  # gRPC resumes here once the reply is sent: update while the client computes
        except FrameRejected as reject:
            note_rejected(turn, reject, stream.peer)
            context.abort(reject.code, reject.message)
        except grpc.RpcError:  # cancelled (idle, evicted, turn closed) while waiting for a frame
            pass
        finally:
            if stream.closed_idle and turn is not None and turn.error is None:
                turn.error = f"CANCELLED: no frame for {self.guard.idle_timeout_s:g} s (idle stream closed)"
            self.guard.release(stream)

    def serve_direct(self, stream: direct.DirectStream, raw: bytes) -> bytes | None:
        """Serve one encoded frame of an in-process stream in the caller's thread: the reply, None after ``end``.

        The checks of a gRPC frame; a refused frame raises :class:`FrameRejected`. The stage
        computes with ``compute_threads`` and its update is done before this returns (over gRPC
        the handler thread completes it after sending the reply: the same thread count and
        weights); the caller's thread count is restored.
        """
        return self._in_callers_thread(stream, lambda: self._serve_frame(raw, stream.turn, in_memory=True))

    def serve_direct_frame(self, stream: direct.DirectStream, frame: Frame, float_dtype: str) -> tuple[Frame | None, int, int]:
        """:meth:`serve_direct` without the bytes: ``(reply, frame size, reply size)``; the reply None after ``end``.

        ``frame`` and the reply cross as :func:`~graftfl.transport.frames.as_delivered` gives them:
        the header and tensors the receiver of the encoded frame would parse (copies at the wire
        dtype) and its size, so every check and byte count is that of :meth:`serve_direct`.
        """
        return self._in_callers_thread(stream, lambda: self._serve_delivered(frame, float_dtype, stream.turn))

    def _in_callers_thread(self, stream: direct.DirectStream, serve):
        caller_threads = torch.get_num_threads()
        try:
            turn, reply = serve()
            turn.stream, stream.turn = stream, turn
            return reply
        except FrameRejected as reject:
            note_rejected(stream.turn, reject, stream.peer())
            raise
        finally:
            if torch.get_num_threads() != caller_threads:
                torch.set_num_threads(caller_threads)

    def _claimed_turn(self, raw: bytes) -> Turn | None:
        """The open turn whose token ``raw`` carries, if any (the real checks follow in :meth:`_serve_frame`)."""
        try:
            token = parse_header(raw)[0].get("token", "")
        except FrameError:
            return None
        with self.lock:
            found = self.turns.get(token)
        return found if found is not None and found.open else None

    def open_streams(self) -> int:
        """Streams currently open (tests, diagnostics)."""
        return self.guard.count()

    def _serve_frame(self, raw: bytes, turn: Turn | None, in_memory: bool = False) -> tuple[Turn, bytes | None]:
        try:
            header, offset = parse_header(raw)
        except FrameError as err:
            raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        tensors_of = lambda specs: validated_tensors(header, raw, offset, specs, self.wire_dtype, self.max_batch)  # noqa: E731
        turn, reply = self._serve(header, len(raw), tensors_of, turn, in_memory, self._encoded)
        return turn, None if reply is None else reply[0]

    def _serve_delivered(self, frame: Frame, float_dtype: str, turn: Turn | None) -> tuple[Turn, tuple[Frame | None, int, int]]:
        try:
            header, delivered, size = as_delivered(frame, float_dtype)
        except FrameError as err:
            raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        tensors_of = lambda specs: checked_delivered(header, delivered.tensors, specs, self.wire_dtype, self.max_batch)  # noqa: E731
        turn, reply = self._serve(header, size, tensors_of, turn, True, lambda answer: as_delivered(answer, self.wire_dtype)[1:])
        return turn, (None, size, 0) if reply is None else (reply[0], size, reply[1])

    def _encoded(self, reply: Frame) -> tuple[bytes, int]:
        encoded = encode_frame(reply, self.wire_dtype)
        return encoded, len(encoded)

    def _serve(self, header: dict, size: int, tensors_of, turn: Turn | None, in_memory: bool, reply_of) -> tuple[Turn, tuple | None]:
        """Check a parsed frame of ``size`` bytes and answer it: ``(turn, reply_of(reply frame))``, None after ``end``.

        ``tensors_of(specs)`` gives the frame's checked tensors; ``reply_of`` turns the reply into
        what goes back and its size.
        """
        with self.lock:
            turn = self._authenticate(str(header.get("token", "")), turn)
            kind = header["kind"]
            if not turn.admit(kind, size, self.max_frame_bytes):
                return turn, None
            specs = self.stage.input_specs(kind, turn.state)
            if specs is None:
                raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected frame kind '{kind}' at this point of the turn")
            tensors = tensors_of(specs)
            if torch.get_num_threads() != self.compute_threads:  # a handler thread starts with the process's count
                torch.set_num_threads(self.compute_threads)
            flush_denormals(self.flush_denormal)  # per thread; a lookup once the thread has it
            # a client in this thread waits for the whole step anyway: the stage updates in the same backward pass
            reply_kind, reply_tensors, meta = self.stage.handle(kind, tensors, turn.state, defer_update=not in_memory)
            reply = reply_of(Frame(reply_kind, reply_tensors, meta))
            turn.bytes_down += reply[1]
        return turn, reply

    def _authenticate(self, token: str, turn: Turn | None) -> Turn:
        if turn is not None:
            if token != turn.token or not turn.open:
                raise FrameRejected(grpc.StatusCode.UNAUTHENTICATED, "token does not match this stream's turn or the turn is over")
            return turn
        found = self.turns.get(token)
        if found is None or not found.open:
            raise FrameRejected(grpc.StatusCode.UNAUTHENTICATED, "unknown or expired data-plane token")
        if found.attached:
            raise FrameRejected(grpc.StatusCode.UNAUTHENTICATED, "this token is already in use by another stream")
        found.attached = True
        return found


def _advertised(bind_address: str, port: int) -> str:
    host = bind_address.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()  # bound to all interfaces: clients dial this machine by name
    return f"{host}:{port}"
