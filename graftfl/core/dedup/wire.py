"""Authenticated envelopes for the PSI messages the server relays.

Every PSI message is ``MAGIC | header length | header JSON | payload | HMAC-SHA256 tag``.
The tag covers the header (message kind, session, sender and receiver ranks, element
count) and the payload, under a key derived from the salt the sites share and the server
does not have. The relaying server can therefore drop or delay messages, but it cannot
forge, alter, reorder the elements of, replay across sessions, or re-address a message
without the receiving site refusing it. That matters: a PSI response is a list in the
order of the request, so a relay that permuted it would make the client drop the wrong
records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from typing import Any

from graftfl.core.codec import json_prefixed

MAGIC = b"GFDD\x01"
TAG_BYTES = 32
MAX_HEADER_BYTES = 4096
KINDS = ("request", "setup", "response")


class DedupProtocolError(ValueError):
    """A relayed dedup message is malformed, unauthenticated or not the one expected."""


def seal(mac_key: bytes, kind: str, session: str, sender: int, receiver: int | None, count: int, payload: bytes) -> bytes:
    """Wrap ``payload`` (a serialized PSI protobuf) in an authenticated envelope.

    ``receiver`` is ``None`` for a message meant for every lower-ranked site (a request)
    or every higher-ranked site (a setup).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dedup message kind {kind!r}; valid: {KINDS}")
    header = json.dumps(
        {"kind": kind, "session": session, "sender": int(sender), "receiver": receiver, "count": int(count)},
        sort_keys=True, separators=(",", ":"),
    ).encode()
    body = MAGIC + struct.pack(">I", len(header)) + header + payload
    return body + hmac.new(mac_key, body, hashlib.sha256).digest()


def open_envelope(mac_key: bytes, frame: Any, *, kind: str, session: str, sender: int, receiver: int | None, max_bytes: int) -> tuple[dict, bytes]:
    """Check an envelope and return ``(header, payload)``; raise :class:`DedupProtocolError` otherwise.

    Everything the header claims is compared with what the receiving site expects, after
    the tag has been verified in constant time.
    """
    what = f"dedup {kind} from site {sender}"
    if not isinstance(frame, (bytes, bytearray)):
        raise DedupProtocolError(f"{what}: expected bytes, got {type(frame).__name__}")
    frame = bytes(frame)
    if len(frame) > max_bytes:
        raise DedupProtocolError(f"{what}: {len(frame)} bytes exceeds the limit of {max_bytes} (dedup.max_message_bytes)")
    if len(frame) < len(MAGIC) + 4 + TAG_BYTES or not frame.startswith(MAGIC):
        raise DedupProtocolError(f"{what}: not a graftfl dedup message (bad magic or too short)")
    body, tag = frame[:-TAG_BYTES], frame[-TAG_BYTES:]
    if not hmac.compare_digest(tag, hmac.new(mac_key, body, hashlib.sha256).digest()):
        raise DedupProtocolError(f"{what}: authentication failed (altered in transit, or the sites do not share the same dedup salt)")
    try:  # the same "magic | length | JSON" start as the data plane's frames, parsed by the same code
        header, payload_start = json_prefixed(body, MAGIC, MAX_HEADER_BYTES, "dedup message", "header", DedupProtocolError)
    except DedupProtocolError as error:
        raise DedupProtocolError(f"{what}: {error}") from error
    if not isinstance(header, dict):
        raise DedupProtocolError(f"{what}: header is not a JSON object")
    expected = {"kind": kind, "session": session, "sender": sender, "receiver": receiver}
    for field, value in expected.items():
        if header.get(field) != value:
            raise DedupProtocolError(f"{what}: header {field}={header.get(field)!r}, expected {value!r} (misrouted or replayed)")
    if not isinstance(header.get("count"), int) or header["count"] < 0:
        raise DedupProtocolError(f"{what}: bad element count {header.get('count')!r}")
    return header, body[payload_start:]
