"""The data plane's client: one bidirectional stream for one turn.

:class:`DataPlaneClient` turns the stream into a synchronous
``exchange(kind, tensors) -> (tensors, meta)`` call, the shape the client roles
of :mod:`graftfl.core.split` expect. A rejected frame raises
:class:`DataPlaneError` carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

import queue
from pathlib import Path

import grpc
import torch

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
        options = [("grpc.max_receive_message_length", max_frame_bytes + GRPC_SLACK_BYTES), ("grpc.max_send_message_length", max_frame_bytes + GRPC_SLACK_BYTES)]
        if ca_cert:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_cert).read_bytes())
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._outbox: queue.Queue = queue.Queue()
        stream = self._channel.stream_stream(SERVICE_METHOD, request_serializer=_identity, response_deserializer=_identity)
        self._replies = stream(iter(self._outbox.get, _END))

    def send_raw(self, raw: bytes) -> bytes:
        """Send one already encoded frame and wait for the reply (tests use it for bad frames)."""
        self._outbox.put(raw)
        self.bytes_up += len(raw)
        try:
            reply = next(self._replies)
        except grpc.RpcError as err:
            raise DataPlaneError(err.code(), err.details()) from err
        except StopIteration as err:
            raise DataPlaneError(None, "stream ended") from err
        self.bytes_down += len(reply)
        return reply

    def exchange(self, kind: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Send one frame, return the reply's tensors and meta."""
        reply = decode_frame(self.send_raw(encode_frame(Frame(kind, tensors, meta or {}, self.token), self.wire_dtype)))
        return reply.tensors, reply.meta

    def close(self) -> None:
        """End the turn cleanly (an ``end`` frame) and close the channel."""
        end = encode_frame(Frame("end", token=self.token), self.wire_dtype)
        self._outbox.put(end)
        self.bytes_up += len(end)
        self._outbox.put(_END)
        try:
            for _ in self._replies:
                pass
        except grpc.RpcError:
            pass
        self._channel.close()

    def abandon(self) -> None:
        """Drop the stream without ending the turn (what a crashing client does)."""
        self._outbox.put(_END)
        self._channel.close()

    def __enter__(self) -> "DataPlaneClient":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()
