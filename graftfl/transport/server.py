"""The data plane's server: a gRPC bidirectional stream inside the ServerApp process.

One RPC, ``/graftfl.DataPlane/Stream``, moves opaque frames (see
:mod:`graftfl.transport.frames`). The strategy opens a *turn* for one client
(:meth:`DataPlaneServer.open_turn`), which creates a one-time random token; the
client presents it in every frame of one stream; :meth:`DataPlaneServer.close_turn`
revokes it. Every frame is validated before it reaches the model:

- unknown, revoked or reused token -> ``UNAUTHENTICATED``;
- frame over ``max_frame_bytes``, unknown kind, wrong tensor names, shape or
  dtype, non-finite values, labels out of range -> ``INVALID_ARGUMENT``.

A bad frame ends only its own stream; the server keeps serving the others. The
stage (the model part the server holds) is shared by all turns and guarded by a
lock, so a late frame of a stalled client cannot interleave with the next
client's step. The stage's own parameter update runs after its reply has been
sent (``stage.complete_step``), overlapping the client's backward pass; read
the stage's weights from another thread only after :meth:`DataPlaneServer.settle`.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from graftfl.core.split import TensorSpec
from graftfl.transport.frames import FLOAT_WIRE_DTYPES, Frame, FrameError, decode_tensors, encode_frame, parse_header, wire_dtypes_of

log = logging.getLogger(__name__)

SERVICE_METHOD = "/graftfl.DataPlane/Stream"
GRPC_SLACK_BYTES = 1 << 20


def _identity(data: bytes) -> bytes:
    return data


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

    def frames_per_second(self) -> float | None:
        """Frames served per second between the turn's first and last frame (the data plane's pace)."""
        if self.first_frame_at is None or self.frames < 3:
            return None
        return (self.frames - 1) / max(self.last_frame_at - self.first_frame_at, 1e-9)


class _Reject(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


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
        PEM files; when both are given the stream is TLS only.
    """

    def __init__(self, stage, bind_address: str = "127.0.0.1:0", advertise_address: str | None = None, *, wire_dtype: str = "float32",
                 max_batch: int = 1024, max_frame_bytes: int = 64 << 20, server_cert: str | None = None, server_key: str | None = None, workers: int = 8):
        if wire_dtype not in FLOAT_WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {list(FLOAT_WIRE_DTYPES)}, got '{wire_dtype}'")
        self.stage, self.wire_dtype, self.max_batch, self.max_frame_bytes = stage, wire_dtype, int(max_batch), int(max_frame_bytes)
        self.lock = threading.Lock()
        self.turns: dict[str, Turn] = {}
        options = [("grpc.max_receive_message_length", self.max_frame_bytes + GRPC_SLACK_BYTES), ("grpc.max_send_message_length", self.max_frame_bytes + GRPC_SLACK_BYTES)]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
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
        self._server.start()
        log.info("data plane listening on %s (advertised %s, tls=%s)", self.port, self.address, self.tls)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()

    def __enter__(self) -> "DataPlaneServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ turns
    def open_turn(self, label: str = "") -> Turn:
        """A new turn with a fresh one-time token (``secrets.token_urlsafe``)."""
        turn = Turn(token=secrets.token_urlsafe(24), label=label)
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
        try:
            for raw in request_iterator:
                turn, reply = self._serve_frame(raw, turn)
                turn.stream = context
                if reply is None:
                    return
                yield reply
                self.settle()  # gRPC resumes here once the reply is sent: update while the client computes
        except _Reject as reject:
            if turn is not None:
                turn.error = f"{reject.code.name}: {reject.message}"
            log.warning("data plane rejected a frame (%s): %s", reject.code.name, reject.message)
            context.abort(reject.code, reject.message)

    def _serve_frame(self, raw: bytes, turn: Turn | None) -> tuple[Turn, bytes | None]:
        try:
            header, offset = parse_header(raw)
        except FrameError as err:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        with self.lock:
            turn = self._authenticate(str(header.get("token", "")), turn)
            turn.bytes_up += len(raw)
            turn.frames += 1
            turn.last_frame_at = time.monotonic()
            if turn.first_frame_at is None:
                turn.first_frame_at = turn.last_frame_at
            if len(raw) > self.max_frame_bytes:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"frame of {len(raw)} bytes exceeds the limit of {self.max_frame_bytes} bytes")
            kind = header["kind"]
            if kind == "end":
                turn.ended_cleanly = True
                return turn, None
            specs = self.stage.input_specs(kind, turn.state)
            if specs is None:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected frame kind '{kind}' at this point of the turn")
            tensors = self._validated(header, raw, offset, specs)
            reply_kind, reply_tensors, meta = self.stage.handle(kind, tensors, turn.state)
            encoded = encode_frame(Frame(reply_kind, reply_tensors, meta), self.wire_dtype)
            turn.bytes_down += len(encoded)
        return turn, encoded

    def _authenticate(self, token: str, turn: Turn | None) -> Turn:
        if turn is not None:
            if token != turn.token or not turn.open:
                raise _Reject(grpc.StatusCode.UNAUTHENTICATED, "token does not match this stream's turn or the turn is over")
            return turn
        found = self.turns.get(token)
        if found is None or not found.open:
            raise _Reject(grpc.StatusCode.UNAUTHENTICATED, "unknown or expired data-plane token")
        if found.attached:
            raise _Reject(grpc.StatusCode.UNAUTHENTICATED, "this token is already in use by another stream")
        found.attached = True
        return found

    def _validated(self, header: dict, raw: bytes, offset: int, specs: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
        dtypes = wire_dtypes_of(header)
        if set(dtypes) != set(specs):
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"frame '{header['kind']}' must carry tensors {sorted(specs)}, got {sorted(dtypes)}")
        for name, spec in specs.items():
            expected = self.wire_dtype if spec.floating else "int64"
            if dtypes[name] != expected:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{name}' has dtype {dtypes[name]}, expected {expected}")
        try:
            tensors = decode_tensors(header, raw, offset)
        except FrameError as err:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        batch = None
        for name, spec in specs.items():
            tensor = tensors[name]
            shape = tuple(tensor.shape)
            if spec.exact:
                ok = shape == spec.shape
            else:
                ok = len(shape) == 1 + len(spec.shape) and shape[1:] == spec.shape and 1 <= shape[0] <= self.max_batch
            if not ok:
                wanted = spec.shape if spec.exact else f"(1..{self.max_batch}, {', '.join(map(str, spec.shape))})"
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{name}' has shape {shape}, expected {wanted}")
            if batch is not None and shape[0] != batch:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{name}' has batch {shape[0]}, other tensors have {batch}")
            batch = shape[0]
            if spec.floating and not bool(torch.isfinite(tensor).all()):
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{name}' contains NaN or infinite values")
            if spec.num_classes is not None and len(tensor) and (int(tensor.min()) < 0 or int(tensor.max()) >= spec.num_classes):
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"labels must lie in [0, {spec.num_classes}), got [{int(tensor.min())}, {int(tensor.max())}]")
        return tensors


def _advertised(bind_address: str, port: int) -> str:
    host = bind_address.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()  # bound to all interfaces: clients dial this machine by name
    return f"{host}:{port}"
