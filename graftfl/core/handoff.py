"""Client-side encryption of relayed bottom weights (``protocol.handoff=relay``).

The finishing client serialises its bottom (and optimizer) state
(:func:`graftfl.core.state_codec.pack_state`) and seals it with AES-256-GCM; the server stores and forwards the
ciphertext only. The key belongs to the clients:

- node-config ``split-key`` (32 bytes as 64 hex characters or base64), given to
  each ``flower-supernode --node-config`` and never to the SuperLink or ServerApp;
- or the environment variable ``GRAFTFL_SPLIT_KEY`` of the SuperNode/ClientApp
  processes (``graftfl deploy-local`` sets it for the SuperNodes only; ``graftfl sim``
  sets a fresh random one for the run's Ray workers when none is set).

The key comes from the client's own node config or environment only, never from
the server's message: a client without a key refuses the relay hand-off
(:class:`MissingSplitKey`) instead of falling back to anything the server knows.
"""

from __future__ import annotations

import base64
import binascii
import io
import os

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from graftfl.core.state_codec import MAGIC as STATE_MAGIC
from graftfl.core.state_codec import pack_state, unpack_state
from graftfl.core.wire import NODE_SPLIT_KEY

KEY_NODE_CONFIG = NODE_SPLIT_KEY
KEY_ENV = "GRAFTFL_SPLIT_KEY"
ASSOCIATED_DATA = b"graftfl-split-relay-v1"
NONCE_BYTES = 12
# Names of the hand-off records in the turn messages (relay: ciphertext; average: weights).
RELAY_KEY = "relay-ciphertext"
AVERAGE_KEY = "average"


class MissingSplitKey(RuntimeError):
    """Relay hand-off on a client without a key of its own."""


def parse_key(text: str) -> bytes:
    """A 32-byte key from 64 hex characters or base64."""
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        try:
            key = base64.b64decode(text, validate=True)
        except binascii.Error as err:
            raise ValueError(f"{KEY_NODE_CONFIG} must be 32 bytes as hex or base64") from err
    if len(key) != 32:
        raise ValueError(f"{KEY_NODE_CONFIG} must be 32 bytes (AES-256), got {len(key)}")
    return key


def client_key(node_config: dict) -> bytes:
    """The relay key of this client: node config ``split-key``, else ``GRAFTFL_SPLIT_KEY``; nothing else."""
    if KEY_NODE_CONFIG in node_config:
        return parse_key(str(node_config[KEY_NODE_CONFIG]))
    if os.environ.get(KEY_ENV):
        return parse_key(os.environ[KEY_ENV])
    raise MissingSplitKey(
        f"protocol.handoff=relay needs a client-held key and this client has none: start each SuperNode with "
        f"--node-config \"... {KEY_NODE_CONFIG}=<64 hex chars>\" or set {KEY_ENV} in its environment "
        f"(the same key on every SuperNode, never on the SuperLink); `graftfl sim` and `graftfl deploy-local` set {KEY_ENV} themselves"
    )


def encrypt_state(key: bytes, state: dict) -> bytes:
    """``nonce || AES-GCM(pack_state(state))``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, pack_state(state), ASSOCIATED_DATA)


def decrypt_state(key: bytes, blob: bytes) -> dict:
    """Inverse of :func:`encrypt_state`; a wrong key or tampered blob raises ``InvalidTag``.

    A state sealed before 2026-12-01 (a checkpoint to resume from) holds ``torch.save``'s zip
    instead, read with ``torch.load(weights_only=True)``.
    """
    plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ASSOCIATED_DATA)
    if plain[: len(STATE_MAGIC)] == STATE_MAGIC:
        return unpack_state(plain)
    return torch.load(io.BytesIO(plain), map_location="cpu", weights_only=True)
