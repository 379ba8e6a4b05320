"""Client-side encryption of relayed bottom weights (``protocol.handoff=relay``).

The finishing client serialises its bottom (and optimizer) state with
``torch.save`` and seals it with AES-256-GCM; the server stores and forwards the
ciphertext only. The key belongs to the clients:

- deployment: node-config ``split-key`` (32 bytes as 64 hex characters or
  base64), given to each ``flower-supernode --node-config`` and never to the
  SuperLink or ServerApp; or the environment variable ``GRAFTFL_SPLIT_KEY`` of the
  SuperNode/ClientApp processes;
- simulation only (``graftfl sim``, where every process is on one machine
  anyway): when no key is configured, the clients derive one with HKDF-SHA256
  from the Flower run id and a fixed label. The server could derive it too, so
  this demonstrates the data flow; it is not a secret. The server tells the
  client it runs in simulation, and a client with a configured key always uses
  its own key.
"""

from __future__ import annotations

import base64
import binascii
import io
import os

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_NODE_CONFIG = "split-key"
KEY_ENV = "GRAFTFL_SPLIT_KEY"
ASSOCIATED_DATA = b"graftfl-split-relay-v1"
NONCE_BYTES = 12
# Names of the hand-off records in the turn messages (relay: ciphertext; average: weights).
RELAY_KEY = "relay-ciphertext"
AVERAGE_KEY = "average"


class MissingSplitKey(RuntimeError):
    """Relay hand-off in deployment without a client key."""


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


def simulation_key(run_id: int | str) -> bytes:
    """The simulation-only key: HKDF-SHA256 of the Flower run id (NOT secret from the server)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"graftfl-split-simulation-key").derive(str(run_id).encode())


def client_key(node_config: dict, run_id: int | str, simulated: bool) -> bytes:
    """The relay key of this client: node config, then environment, then (simulation only) derived."""
    if KEY_NODE_CONFIG in node_config:
        return parse_key(str(node_config[KEY_NODE_CONFIG]))
    if os.environ.get(KEY_ENV):
        return parse_key(os.environ[KEY_ENV])
    if simulated:
        return simulation_key(run_id)
    raise MissingSplitKey(
        f"protocol.handoff=relay needs a client-held key: start each SuperNode with --node-config \"... {KEY_NODE_CONFIG}=<64 hex chars>\" "
        f"(the same key on every SuperNode, never on the SuperLink) or set {KEY_ENV}"
    )


def encrypt_state(key: bytes, state: dict) -> bytes:
    """``nonce || AES-GCM(torch.save(state))``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, buffer.getvalue(), ASSOCIATED_DATA)


def decrypt_state(key: bytes, blob: bytes) -> dict:
    """Inverse of :func:`encrypt_state`; a wrong key or tampered blob raises ``InvalidTag``."""
    plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ASSOCIATED_DATA)
    return torch.load(io.BytesIO(plain), map_location="cpu", weights_only=True)
