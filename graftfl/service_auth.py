"""Per-site bearer tokens for ``graftfl serve`` (the prediction service).

Each site gets its own random token (``secrets.token_hex(32)``: hex never starts with ``-``,
which a command line would read as an option). The service
keeps only SHA-256 hashes of the tokens (and writes only those into the run
directory, ``service_tokens.json``); a request's token is hashed and compared
with every stored hash in constant time (:func:`hmac.compare_digest`, no early
exit), so neither a timing difference nor the run directory gives a token away.
Missing or wrong token: HTTP 401 before the body is read. A token is bound to its
site: a request whose ``clientID`` names another site gets HTTP 403.

Tokens reach the service either from a file the operator keeps (``--tokens``,
JSON ``{"site-0": "<token>", ...}``) or are issued at start and shown once
(stdout, or a file the operator names, created with mode 0600).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

TOKEN_ENV = "GRAFTFL_SERVICE_TOKEN"
HASH_FILE = "service_tokens.json"
MIN_TOKEN_CHARS = 16


class TokenFileError(ValueError):
    """A tokens file that cannot be used (unreadable, not a JSON object of site -> token, weak tokens)."""


def token_hash(token: str) -> str:
    """Hex SHA-256 of a token (what is stored instead of the token)."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """The hashes of the tokens the service accepts, one per site.

    Parameters
    ----------
    hashes : dict
        ``{site: sha256 hex of its token}``.
    """

    def __init__(self, hashes: dict[str, str]):
        if not hashes:
            raise TokenFileError("no site tokens: the service would answer nobody")
        self.hashes = {str(site): str(digest) for site, digest in hashes.items()}

    @classmethod
    def from_tokens(cls, tokens: dict[str, str]) -> "TokenTable":
        """A table from plain tokens, keeping only their hashes."""
        return cls({site: token_hash(token) for site, token in tokens.items()})

    def site_of(self, token: str | None) -> str | None:
        """The site whose token this is, or None; compares with every hash in constant time."""
        if not token:
            return None
        presented = token_hash(token).encode()
        found = None
        for site, digest in self.hashes.items():  # no early exit: the time does not depend on which site matched
            if hmac.compare_digest(presented, digest.encode()):
                found = site
        return found

    def save_hashes(self, run_dir: str | Path) -> Path:
        """Write ``service_tokens.json`` (hashes only) into ``run_dir``."""
        path = Path(run_dir) / HASH_FILE
        path.write_text(json.dumps({"algorithm": "sha256", "sites": self.hashes}, indent=2) + "\n")
        return path


def issue_tokens(sites: Iterable[str]) -> dict[str, str]:
    """A fresh random token for each site."""
    tokens = {str(site): secrets.token_hex(32) for site in sites}  # 256 bits; never starts with '-'
    if not tokens:
        raise TokenFileError("no sites to issue tokens for")
    return tokens


def read_tokens_file(path: str | Path) -> dict[str, str]:
    """``{site: token}`` from a JSON file the operator keeps (``graftfl serve --tokens``)."""
    path = Path(path)
    try:
        tokens = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenFileError(f"cannot read tokens file {path}: {err}") from err
    if not isinstance(tokens, dict) or not tokens or not all(isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()):
        raise TokenFileError(f'tokens file {path} must be a JSON object {{"site-0": "<token>", ...}} with at least one site')
    weak = sorted(site for site, token in tokens.items() if len(token) < MIN_TOKEN_CHARS)
    if weak:
        raise TokenFileError(f"tokens file {path}: the tokens of {weak} are shorter than {MIN_TOKEN_CHARS} characters")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("tokens file %s is readable by other users (chmod 600 it)", path)
    return tokens


def write_tokens_file(path: str | Path, tokens: dict[str, str]) -> Path:
    """Create ``path`` with mode 0600 holding ``tokens`` as JSON; an existing file is never overwritten."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise TokenFileError(f"{path} exists: choose a new file for the issued tokens (or serve with --tokens {path})") from err
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(tokens, indent=2) + "\n")
    return path


class BearerAuth:
    """ASGI middleware: HTTP 401 unless ``Authorization: Bearer <token>`` names a site of ``tokens``.

    The site is put in ``scope["state"]["site"]`` for the endpoint (``request.state.site``).
    """

    def __init__(self, app, tokens: TokenTable):
        self.app, self.tokens = app, tokens

    async def __call__(self, scope, receive, send):
        """Pass an HTTP request on with its site in the scope when its bearer token is known; answer 401 otherwise."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        site = self.tokens.site_of(token.strip()) if scheme.lower() == "bearer" else None
        if site is None:
            reason = "missing bearer token" if not header else "invalid token"
            log.warning("prediction service: %s from %s", reason, (scope.get("client") or ("?",))[0])
            detail = f"{reason}: send 'Authorization: Bearer <your site token>' (graftfl predict --token or ${TOKEN_ENV})"
            response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        scope.setdefault("state", {})["site"] = site
        return await self.app(scope, receive, send)
