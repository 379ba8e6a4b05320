"""The data plane's client: one bidirectional stream for one turn.

:class:`DataPlaneClient` turns the stream into a synchronous
``exchange(kind, tensors) -> (tensors, meta)`` call, the shape the client roles
of :mod:`graftfl.core.split` expect. A rejected frame raises
:class:`DataPlaneError` carrying the gRPC status code and the server's message.

The gRPC channel (connection, TLS session) is kept per process for each address and
CA: opening and closing one cost 4 ms per turn, as much as a site's whole LeNet turn
of compute at 60 samples. A channel carries no credential (the turn token travels
in every frame), so a later turn on the same channel is no less isolated.

A server of this very process started with ``direct=True`` (the in-process simulation) is
reached without gRPC: the same frames go to it in memory (:mod:`graftfl.transport.direct`).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import OrderedDict
from pathlib import Path

import grpc
import torch

from graftfl.transport import direct
from graftfl.transport.checks import FrameRejected
from graftfl.transport.frames import Frame, decode_frame, encode_frame
from graftfl.transport.server import GRPC_SLACK_BYTES, SERVICE_METHOD

_END = object()


class DataPlaneError(RuntimeError):
    """The server ended the stream (``code`` is the gRPC status code)."""

    def __init__(self, code: grpc.StatusCode | None, details: str):
        super().__init__(f"data plane: {code.name if code else 'closed'}: {details}")
        self.code, self.details = code, details


def _identity(data: bytes) -> bytes:
    return data


_CHANNELS: OrderedDict[tuple, grpc.Channel] = OrderedDict()  # (address, CA digest, frame limit) -> open channel
_CHANNELS_KEPT = 8
_CHANNELS_LOCK = threading.Lock()


def shared_channel(address: str, ca_cert: str | None, max_frame_bytes: int) -> grpc.Channel:
    """This process's channel to ``address`` with this CA and frame limit (opened on first use, at most 8 kept)."""
    root = Path(ca_cert).read_bytes() if ca_cert else None
    key = (address, hashlib.sha256(root).hexdigest() if root is not None else None, int(max_frame_bytes))
    with _CHANNELS_LOCK:
        if key in _CHANNELS:
            _CHANNELS.move_to_end(key)
            return _CHANNELS[key]
        options = [("grpc.max_receive_message_length", max_frame_bytes + GRPC_SLACK_BYTES), ("grpc.max_send_message_length", max_frame_bytes + GRPC_SLACK_BYTES)]
        if root is not None:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        _CHANNELS[key] = channel
        while len(_CHANNELS) > _CHANNELS_KEPT:  # the oldest one's streams have ended: its turns were earlier
            _CHANNELS.popitem(last=False)[1].close()
        return channel


def _direct_stream(address: str, ca_cert: str | None) -> direct.DirectStream | None:
    """A stream to the server of this process served directly at ``address``, or None (then: gRPC).

    With TLS on either side the client dials gRPC: the server's certificate is then checked
    against the client's CA as it would be between processes.
    """
    server = direct.server_at(address)
    if server is None or ca_cert or server.tls:
        return None
    return direct.DirectStream(server)


class DataPlaneClient:
    """A client's stream to the data plane for one turn.

    Parameters
    ----------
    address : str
        ``host:port`` from the turn's Flower message.
    token : str
        The turn's one-time token (sent in every frame).
    wire_dtype : str
        ``float32|float16|bfloat16`` for floating tensors.
    ca_cert : path, optional
        PEM of the CA that signed the server certificate; TLS when given.
    max_frame_bytes : int
        Largest frame this client accepts.
    """

    def __init__(self, address: str, token: str, *, wire_dtype: str = "float32", ca_cert: str | None = None, max_frame_bytes: int = 64 << 20):
        self.address, self.token, self.wire_dtype = address, token, wire_dtype
        self.bytes_up = self.bytes_down = 0
        self._direct = _direct_stream(address, ca_cert)
        if self._direct is None:
            self._outbox: queue.Queue = queue.Queue()
            channel = shared_channel(address, ca_cert, max_frame_bytes)
            stream = channel.stream_stream(SERVICE_METHOD, request_serializer=_identity, response_deserializer=_identity)
            self._replies = stream(iter(self._outbox.get, _END))

    @property
    def in_memory(self) -> bool:
        """Whether the frames go to a server of this process without gRPC (:mod:`graftfl.transport.direct`)."""
        return self._direct is not None

    def send_raw(self, raw: bytes) -> bytes:
        """Send one already encoded frame and wait for the reply (tests use it for bad frames)."""
        self.bytes_up += len(raw)
        reply = self._direct_reply(raw) if self._direct is not None else self._grpc_reply(raw)
        self.bytes_down += len(reply)
        return reply

    def _grpc_reply(self, raw: bytes) -> bytes:
        self._outbox.put(raw)
        try:
            return next(self._replies)
        except grpc.RpcError as err:
            raise DataPlaneError(err.code(), err.details()) from err
        except StopIteration as err:
            raise DataPlaneError(None, "stream ended") from err

    def _direct_reply(self, raw: bytes) -> bytes:
        return self._direct_answer(lambda: self._direct.send(raw), lambda reply: reply)

    def _direct_answer(self, send, reply_of):
        """``send()``'s answer in memory, with gRPC's errors: a refused frame or an ended stream is a :class:`DataPlaneError`."""
        try:
            answer = send()
        except FrameRejected as rejected:
            raise DataPlaneError(rejected.code, rejected.message) from rejected
        if reply_of(answer) is None:
            raise DataPlaneError(None, "stream ended")
        return answer

    def exchange(self, kind: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Send one frame, return the reply's tensors and meta."""
        frame = Frame(kind, tensors, meta or {}, self.token)
        if self._direct is None:
            reply = decode_frame(self.send_raw(encode_frame(frame, self.wire_dtype)))
            return reply.tensors, reply.meta
        # in memory: the frames as their receivers would parse them, the same sizes
        reply, up, down = self._direct_answer(lambda: self._direct.exchange(frame, self.wire_dtype), lambda answer: answer[0])
        self.bytes_up, self.bytes_down = self.bytes_up + up, self.bytes_down + down
        return reply.tensors, reply.meta

    def close(self) -> None:
        """End the turn cleanly (an ``end`` frame) and wait for the server to close the stream."""
        end = encode_frame(Frame("end", token=self.token), self.wire_dtype)
        self.bytes_up += len(end)
        if self._direct is not None:
            try:
                self._direct.send(end)
            except FrameRejected:
                pass  # as over gRPC: a stream the server has already ended ends quietly
            return
        self._outbox.put(end)
        self._outbox.put(_END)
        try:
            for _ in self._replies:
                pass
        except grpc.RpcError:
            pass

    def abandon(self) -> None:
        """Drop the stream without ending the turn (what a crashing client does)."""
        if self._direct is not None:
            self._direct.cancel()
            return
        self._outbox.put(_END)
        self._replies.cancel()

    def __enter__(self) -> "DataPlaneClient":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()
