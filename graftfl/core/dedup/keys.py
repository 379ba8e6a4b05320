"""Identifier keys and salted PSI elements.

A site's manifest rows become *keys* (one normalized string per record, built from
configured columns) and the keys become *elements* (HMAC-SHA256 under a key derived
from the salt the sites share). Only elements enter the PSI, and the PSI blinds them
again, so neither a raw identifier nor an unsalted hash of one ever leaves a site.
The salt keeps two federations' elements incomparable and, through the message
authentication key derived from it, stops the relaying server from forging protocol
messages (see :mod:`graftfl.core.dedup.wire`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SALT_NODE_CONFIG_KEY = "dedup-salt"
SALT_ENV_VAR = "GRAFTFL_DEDUP_SALT"
MIN_SALT_CHARS = 16
_WHITESPACE_RUN = re.compile(r"\s+")


class DedupKeyError(ValueError):
    """A record has no usable identifier key, or the key specification is invalid."""


def parse_key_columns(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Column names of the identifier key: ``"patient_id"`` or ``"name|birth_date|sex"`` (or a list)."""
    columns = tuple(part.strip() for part in (spec.split("|") if isinstance(spec, str) else spec))
    if not columns or any(not column for column in columns):
        raise DedupKeyError(f"dedup key must name one or more manifest columns, e.g. 'patient_id' or 'name|birth_date|sex'; got {spec!r}")
    if len(set(columns)) != len(columns):
        raise DedupKeyError(f"dedup key names a column twice: {spec!r}")
    return columns


@dataclass(frozen=True)
class KeySpec:
    """How a record's identifier key is built from manifest columns.

    Parameters
    ----------
    columns
        Manifest column names, in order (``("patient_id",)`` or ``("name", "birth_date", "sex")``).
    nfkc
        Apply Unicode NFKC normalization first (full-width digits, ligatures, compatibility forms).
    collapse_whitespace
        Replace every run of inner whitespace by one space (after trimming both ends).
    """

    columns: tuple[str, ...] = ("patient_id",)
    nfkc: bool = True
    collapse_whitespace: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", parse_key_columns(self.columns))

    @property
    def domain(self) -> str:
        """Names the key's construction so that keys built differently never compare equal."""
        return f"cols={'|'.join(self.columns)};nfkc={int(self.nfkc)};ws={int(self.collapse_whitespace)}"

    def normalize(self, value: object) -> str:
        """Trim, case-fold and (optionally) NFKC-normalize one column value."""
        text = "" if value is None else str(value)
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        text = text.strip()
        if self.collapse_whitespace:
            text = _WHITESPACE_RUN.sub(" ", text)
        # casefold after NFKC, then NFKC again: casefolding can produce non-normalized sequences
        text = text.casefold()
        return unicodedata.normalize("NFKC", text) if self.nfkc else text

    def key(self, row: Mapping[str, object], where: str = "record") -> str:
        """The normalized key of one manifest row.

        Composite keys length-prefix every part (``"5:alice|10:1990-01-02|1:f"``), so no value,
        whatever characters it holds, can make two different tuples join to the same key.
        """
        parts = []
        for column in self.columns:
            if column not in row:
                raise DedupKeyError(f"{where} has no column '{column}' (dedup key columns: {list(self.columns)}; row has {sorted(row)})")
            value = self.normalize(row[column])
            if not value:
                raise DedupKeyError(f"{where} has an empty '{column}': every record needs the dedup key {list(self.columns)}")
            parts.append(f"{len(value)}:{value}")
        return "|".join(parts)


def record_keys(rows: Iterable[Mapping[str, object]], spec: KeySpec) -> list[str]:
    """One normalized key per manifest row (rows in order; the position is the record index)."""
    return [spec.key(row, where=f"record {index}") for index, row in enumerate(rows)]


def resolve_salt(node_config: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None) -> bytes:
    """The federation's shared dedup salt, from node-config ``dedup-salt`` or ``$GRAFTFL_DEDUP_SALT``.

    The salt is a secret the sites share out of band; it is never taken from the server.
    """
    environ = os.environ if environ is None else environ
    value = (node_config or {}).get(SALT_NODE_CONFIG_KEY) or environ.get(SALT_ENV_VAR)
    if not value:
        raise DedupKeyError(
            f"dedup needs a salt shared by the sites: set node-config '{SALT_NODE_CONFIG_KEY}' or ${SALT_ENV_VAR} "
            "(same value at every site, never given to the server); make one with "
            "python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    return check_salt(value)


def check_salt(value: str | bytes) -> bytes:
    """The salt as bytes; refuses one too short to resist guessing from the relayed MAC tags."""
    salt = value.encode() if isinstance(value, str) else bytes(value)
    if len(salt) < MIN_SALT_CHARS:
        raise DedupKeyError(f"dedup salt is {len(salt)} characters; use at least {MIN_SALT_CHARS} random ones (e.g. secrets.token_hex(32))")
    return salt


@dataclass(frozen=True)
class SaltedKeys:
    """Keys derived from the shared salt, each for one purpose (domain separation)."""

    element_key: bytes
    mac_key: bytes

    @classmethod
    def from_salt(cls, salt: str | bytes) -> SaltedKeys:
        """Derive the element and MAC keys from the sites' shared ``salt`` (HMAC-SHA256, domain separated)."""
        root = check_salt(salt)
        derive = lambda label: hmac.new(root, b"graftfl-dedup-v1/" + label, hashlib.sha256).digest()
        return cls(element_key=derive(b"element"), mac_key=derive(b"mac"))

    def element(self, kind: str, domain: str, value: str) -> str:
        """The PSI element of ``value``: hex HMAC-SHA256 over kind, key domain and value."""
        message = f"{kind}\x00{domain}\x00{value}".encode()
        return hmac.new(self.element_key, message, hashlib.sha256).hexdigest()
