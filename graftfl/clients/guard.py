"""What a site returns to the server carries no secret of the site.

Flower turns an exception raised by a ClientApp handler into the reply's error
reason (``str(exception)``), which the server reads and records. Every handler is
therefore wrapped by :func:`guarded`: an exception leaves the site as a
:class:`SiteError` whose text has the site's secrets replaced by ``<redacted>``
(and is logged at the site in the same scrubbed form). Secrets are the relay key
(node config ``split-key``, ``GRAFTFL_SPLIT_KEY``; in hex, base64 and bytes form)
and every node-config value whose name says key, token, secret or password (for
files, e.g. a TLS private key, also the file's contents).
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import re
from pathlib import Path

from flwr.app import Context, Message

from graftfl.core.dedup.keys import SALT_ENV_VAR
from graftfl.core.handoff import KEY_ENV, parse_key

log = logging.getLogger(__name__)

REDACTED = "<redacted>"
SECRET_NAME = re.compile(r"key|token|secret|password|salt", re.IGNORECASE)  # "salt": dedup-salt, the sites' PSI secret
MAX_SECRET_FILE_BYTES = 1 << 16


class SiteError(RuntimeError):
    """A site's handler failed; the text is scrubbed of the site's secrets."""


def _forms(value: str) -> set[str]:
    """A secret as written, and as the 32-byte relay key it may encode (hex, base64, bytes repr)."""
    forms = {value, value.strip()}
    try:
        key = parse_key(value)
    except (ValueError, TypeError):
        return forms
    return forms | {key.hex(), key.hex().upper(), base64.b64encode(key).decode(), repr(key)[2:-1]}


def _file_secrets(value: str) -> set[str]:
    """Lines of a small file named by a secret node-config value (a PEM key's body, for instance)."""
    try:
        path = Path(value)
        if path.is_file() and path.stat().st_size <= MAX_SECRET_FILE_BYTES:
            return {line.strip() for line in path.read_text(errors="ignore").splitlines() if len(line.strip()) >= 16 and "-----" not in line}
    except (OSError, ValueError):
        pass
    return set()


def site_secrets(context: Context) -> set[str]:
    """Every string of this site that must never reach the server."""
    found: set[str] = set()
    for variable in (KEY_ENV, SALT_ENV_VAR):
        if os.environ.get(variable):
            found |= _forms(os.environ[variable])
    for name, value in dict(context.node_config).items():
        if SECRET_NAME.search(str(name)) and str(value).strip():
            found |= _forms(str(value)) | _file_secrets(str(value))
    return {secret for secret in found if len(secret) >= 8}  # short strings would redact ordinary words


def scrub(text: str, secrets: set[str]) -> str:
    """``text`` with every secret (longest first) replaced by ``<redacted>``."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def guarded(handler):
    """Wrap a ClientApp handler so that what it raises names no secret of the site."""

    @functools.wraps(handler)
    def run(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as err:  # every failure becomes a reply error the server reads
            text = scrub(f"{type(err).__name__}: {err}", site_secrets(context))
            log.warning("%s failed at this site: %s", message.metadata.message_type, text)
            raise SiteError(text) from None  # no chained original: its text is the unscrubbed one

    return run
