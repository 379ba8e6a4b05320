"""The on-disk cache of a site's decoded tensors, keyed by the content of its files.

In deployment every Flower message starts a fresh ClientApp process, so a site would decode
all its images again for every message. Decoded tensors are therefore cached on the site's own
disk (``<data-path>/.graftfl-cache/``, or node-config ``cache-dir``) and never leave it.

Keying by content, cheaply: the cache key is a SHA-256 over every source file's *content*
hash (plus the manifest and the loading parameters). To avoid reading every file on every
load, a content index (``content-index.json``) memoizes ``(path, size, mtime_ns) -> sha256``:
a file whose size and modification time are unchanged is not re-read, a changed one is
re-hashed, so an edit, an added or a removed file gives a new key. The memo trusts
``(size, mtime_ns)`` as ``make`` and ``rsync`` do; ``verify=True`` (node-config
``cache-verify=true``) re-hashes every file's bytes on each load instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

CACHE_DIRNAME = ".graftfl-cache"
CACHE_FORMAT_VERSION = 1
INDEX_NAME = "content-index.json"
ENTRIES_KEPT = 4  # decoded copies kept per cache folder (e.g. the refuse and resize variants, an older data version)

log = logging.getLogger(__name__)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class ContentIndex:
    """The ``(path, size, mtime_ns) -> sha256`` memo of one site folder."""

    def __init__(self, cache_dir: Path | None):
        self.path = cache_dir / INDEX_NAME if cache_dir else None
        self.entries: dict[str, list] = {}
        self.changed = False
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):  # a damaged memo only costs re-hashing
                self.entries = {}

    def fingerprint(self, data_path: Path, refs: Iterable[str], verify: bool = False) -> str:
        """SHA-256 over ``(path, content hash)`` of every file in ``refs`` (relative to ``data_path``)."""
        digest = hashlib.sha256()
        fresh: dict[str, list] = {}
        for ref in sorted(set(refs)):
            stat = os.stat(data_path / ref)
            known = self.entries.get(ref)
            if not verify and known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
                content = known[2]
            else:
                content = _file_sha256(data_path / ref)
                self.changed = True
            fresh[ref] = [stat.st_size, stat.st_mtime_ns, content]
            digest.update(f"{ref}\0{content}\n".encode())
        if len(fresh) != len(self.entries):
            self.changed = True
        self.entries = fresh
        return digest.hexdigest()

    def save(self) -> None:
        """Write the cache file if anything changed since it was loaded (atomically)."""
        if self.path and self.changed:
            _atomic_write(self.path, json.dumps(self.entries, separators=(",", ":")).encode())
            self.changed = False


def _atomic_write(path: Path, payload: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def usable_cache_dir(data_path: Path, cache_dir: str | os.PathLike | None) -> Path | None:
    """The cache folder (created when missing), or None when it cannot be written (read-only data)."""
    folder = Path(cache_dir).expanduser() if cache_dir else data_path / CACHE_DIRNAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        log.warning("site data cache disabled: %s is not writable (%s); every load decodes the images again", folder, err)
        return None
    return folder


def cache_key(fingerprint: str, params: dict) -> str:
    """The entry name: the files' fingerprint and every parameter that changes the decoded tensors."""
    text = json.dumps({"version": CACHE_FORMAT_VERSION, "files": fingerprint, **params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_entry(cache_dir: Path, key: str) -> dict | None:
    """A cached payload (tensors and lists, loaded with ``weights_only=True``), or None."""
    path = cache_dir / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any damage (truncated file, foreign pickle) means: decode again, never trust it
        log.warning("ignoring the damaged site data cache entry %s (%s)", path, err)
        return None
    os.utime(path)  # recently used: kept by the pruning in write_entry
    return payload


def write_entry(cache_dir: Path, key: str, payload: dict) -> None:
    """Store a payload atomically and keep only the :data:`ENTRIES_KEPT` most recently used entries."""
    handle, temporary = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, cache_dir / f"{key}.pt")
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    entries = sorted(cache_dir.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in entries[ENTRIES_KEPT:]:
        old.unlink(missing_ok=True)
