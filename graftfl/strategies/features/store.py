"""The server's feature store: one SQLite row per uploaded (latent, label) sample.

SQLite in WAL mode, ``synchronous=FULL`` by default, so a chunk whose
:meth:`FeatureStore.ingest_chunk` has returned is on disk and survives a killed
server process. The unique key ``(client_id, upload_id, row_index)`` makes a
re-sent chunk a no-op (``INSERT OR IGNORE``), and a chunk is one transaction: it
is in the store whole or not at all, and only then acknowledged to its site.

The store also reads and writes the paper's JSON message schema, one message per
line (JSON Lines)::

    {"message": {"clientID": "site-0", "label": 3, "value": [0.1, ...],
                 "mode": "learning", "timestamp": "2026-11-22T05:00:00.000000+00:00"},
     "key": {"uploadID": "site-0/chunk-00000", "row": 0}}

``key`` is graftfl's addition (so re-importing an export into the same store adds
nothing); a plain paper message without it is keyed by a hash of its content.

Sites are not trusted: :class:`ChunkRules` says what a chunk must look like (latent
length, finite values, one label per row, labels in ``[0, num_classes)``, at most
``max_rows`` rows). The server checks every reply against them before it builds a
:class:`Chunk`, and a store opened with ``rules`` refuses (:class:`InvalidChunk`)
any chunk that breaks them, so no bad row reaches the store or the classifier.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id   TEXT    NOT NULL,
    upload_id   TEXT    NOT NULL,
    row_index   INTEGER NOT NULL,
    label       INTEGER,
    vector      BLOB    NOT NULL,
    dim         INTEGER NOT NULL,
    mode        TEXT    NOT NULL,
    timestamp   TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    UNIQUE (client_id, upload_id, row_index)
);
CREATE INDEX IF NOT EXISTS features_mode ON features (mode, id);
"""


def utc_now() -> str:
    """The current UTC time in ISO 8601 with microseconds (the store's timestamps)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


class InvalidChunk(ValueError):
    """A chunk (or a site's reply) the server refuses; the message is the reason."""


@dataclass(frozen=True)
class ChunkRules:
    """What the rows of a chunk must look like before they may be stored.

    Attributes
    ----------
    latent_dim : int or None
        Required length of every latent vector (``protocol.latent_dim``); None: any.
    num_classes : int or None
        Labels must lie in ``[0, num_classes)``; None: any non-negative integer.
    max_rows : int or None
        Most rows one chunk may hold (``protocol.chunk_size``); None: no limit.
    """

    latent_dim: int | None = None
    num_classes: int | None = None
    max_rows: int | None = None

    def problem(self, vectors: np.ndarray, labels: np.ndarray | None = None) -> str | None:
        """Why ``vectors`` (and ``labels``) break the rules, or None when they are fine.

        Parameters
        ----------
        vectors : np.ndarray
            The latents as received (any dtype; floating point is required).
        labels : np.ndarray or None
            One integer label per row; None for service-mode latents (no labels).

        Returns
        -------
        str or None
            A short reason, for logs and metrics.
        """
        return self.vector_problem(np.asarray(vectors)) or (None if labels is None else self.label_problem(np.asarray(labels), len(vectors)))

    def vector_problem(self, vectors: np.ndarray) -> str | None:
        """Shape, length, size, dtype and finiteness of the latents."""
        if vectors.ndim != 2:
            return f"latents have shape {tuple(vectors.shape)}, expected (rows, latent_dim)"
        if self.latent_dim is not None and vectors.shape[1] != self.latent_dim:
            return f"latent length {vectors.shape[1]}, expected latent_dim={self.latent_dim}"
        if self.max_rows is not None and len(vectors) > self.max_rows:
            return f"{len(vectors)} rows, more than chunk_size={self.max_rows}"
        if not np.issubdtype(vectors.dtype, np.floating):
            return f"latents of dtype {vectors.dtype}, expected floating point"
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused too
            bad = int(np.count_nonzero(~np.isfinite(vectors.astype(np.float32))))
        return f"{bad} non-finite latent values" if bad else None

    def label_problem(self, labels: np.ndarray, rows: int) -> str | None:
        """One integer label per row, each in ``[0, num_classes)``."""
        if labels.ndim != 1 or len(labels) != rows:
            return f"{rows} latent rows do not match labels of shape {tuple(labels.shape)}"
        if len(labels) and not np.issubdtype(labels.dtype, np.integer):
            return f"labels of dtype {labels.dtype}, expected integers"
        outside = labels[(labels < 0) | (labels >= self.num_classes)] if self.num_classes is not None else labels[labels < 0]
        if len(outside):
            return f"{len(outside)} labels outside [0, {self.num_classes or 'inf'}), e.g. {int(outside[0])}"
        return None


@dataclass
class Chunk:
    """One upload chunk of one site: rows ``first_row ..`` of its latent matrix.

    Attributes
    ----------
    client_id : str
        The site (the paper's ``clientID``).
    upload_id : str
        Names the chunk; with ``client_id`` and the row index it is the dedup key.
    first_row : int
        Row index of ``vectors[0]`` within the upload.
    labels : np.ndarray
        ``int64[n]``.
    vectors : np.ndarray
        ``float32[n, d]`` latent vectors.
    message_id : str
        The Flower message that carried the chunk (recorded per row).
    mode : str
        ``learning`` (labelled) or ``service``.
    """

    client_id: str
    upload_id: str
    first_row: int
    labels: np.ndarray
    vectors: np.ndarray
    message_id: str = ""
    mode: str = "learning"

    def __post_init__(self):
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        problem = ChunkRules().problem(self.vectors, self.labels)
        if problem:
            raise InvalidChunk(f"chunk {self.upload_id}: {problem}")


class FeatureStore:
    """SQLite (WAL) store of uploaded latent vectors; thread-safe.

    Parameters
    ----------
    path : Path
        Database file (created with its schema when missing).
    synchronous : str
        SQLite ``synchronous`` pragma: ``FULL`` (default) makes every committed
        chunk durable against power loss too; ``NORMAL`` only against a killed
        process (WAL), and is faster.
    rules : ChunkRules or None
        When given, :meth:`ingest_chunk` refuses chunks that break them.
    """

    def __init__(self, path: Path | str, synchronous: str = "FULL", rules: ChunkRules | None = None):
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got '{synchronous}'")
        self.path = Path(path)
        self.rules = rules
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ writing ---

    def _insert(self, rows: list[tuple]) -> int:
        """Insert rows in one transaction; returns how many were new."""
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO features (client_id, upload_id, row_index, label, vector, dim, mode, timestamp, message_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return self._conn.total_changes - before

    def ingest_chunk(self, chunk: Chunk, timestamp: str | None = None) -> int:
        """Store a chunk atomically; returns the number of new rows (0 for a re-send).

        When this returns, the chunk is committed: only then acknowledge it.

        Raises
        ------
        InvalidChunk
            The chunk breaks the store's ``rules``; nothing is written.
        """
        problem = self.rules.problem(chunk.vectors, chunk.labels if chunk.mode == "learning" else None) if self.rules else None
        if problem:
            raise InvalidChunk(f"chunk {chunk.client_id}/{chunk.upload_id}: {problem}")
        stamp = timestamp or utc_now()
        dim = int(chunk.vectors.shape[1])
        rows = [
            (chunk.client_id, chunk.upload_id, chunk.first_row + i, int(label), vector.tobytes(), dim, chunk.mode, stamp, chunk.message_id)
            for i, (label, vector) in enumerate(zip(chunk.labels, chunk.vectors, strict=True))
        ]
        return self._insert(rows)

    # ------------------------------------------------------------ reading ---

    def count(self, mode: str | None = "learning") -> int:
        """Number of stored rows of ``mode`` (all modes when None)."""
        with self._lock:
            if mode is None:
                return int(self._conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])
            return int(self._conn.execute("SELECT COUNT(*) FROM features WHERE mode = ?", (mode,)).fetchone()[0])

    def rows_of_upload(self, client_id: str, upload_id: str) -> int:
        """How many rows of one chunk are stored (a committed chunk is all of it)."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM features WHERE client_id = ? AND upload_id = ?", (client_id, upload_id)).fetchone()[0])

    def upload_sizes(self) -> dict[tuple[str, str], int]:
        """``(client_id, upload_id) -> rows`` for every stored chunk."""
        with self._lock:
            rows = self._conn.execute("SELECT client_id, upload_id, COUNT(*) FROM features GROUP BY client_id, upload_id").fetchall()
        return {(client, upload): int(n) for client, upload, n in rows}

    def load(self, mode: str = "learning") -> tuple[np.ndarray, np.ndarray]:
        """All vectors and labels of ``mode``, in key order (independent of arrival order)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT label, vector, dim FROM features WHERE mode = ? ORDER BY client_id, upload_id, row_index", (mode,)
            ).fetchall()
        if not rows:
            return np.empty((0, 0), dtype=np.float32), np.empty(0, dtype=np.int64)
        dims = {dim for _, _, dim in rows}
        if len(dims) != 1:
            raise ValueError(f"the store holds vectors of several lengths {sorted(dims)}; one classifier needs one length")
        vectors = np.frombuffer(b"".join(blob for _, blob, _ in rows), dtype=np.float32).reshape(len(rows), dims.pop())
        labels = np.array([label for label, _, _ in rows], dtype=np.int64)
        return vectors.copy(), labels

    def keys(self) -> list[tuple[str, str, int]]:
        """The (client id, upload id, row index) of every stored row, in insertion order."""
        with self._lock:
            return [tuple(r) for r in self._conn.execute("SELECT client_id, upload_id, row_index FROM features ORDER BY id")]

    # ---------------------------------------------------- paper JSON schema ---

    def export_json(self, path: Path | str, mode: str | None = None) -> int:
        """Write every row (or those of ``mode``) as paper-schema JSON Lines; returns the count."""
        query = "SELECT client_id, upload_id, row_index, label, vector, mode, timestamp FROM features"
        args: tuple = ()
        if mode is not None:
            query, args = query + " WHERE mode = ?", (mode,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY id", args).fetchall()
        with open(path, "w") as handle:
            for client, upload, row, label, blob, row_mode, stamp in rows:
                message = {
                    "message": {
                        "clientID": client,
                        "label": label,
                        "value": np.frombuffer(blob, dtype=np.float32).tolist(),
                        "mode": row_mode,
                        "timestamp": stamp,
                    },
                    "key": {"uploadID": upload, "row": row},
                }
                handle.write(json.dumps(message) + "\n")
        return len(rows)

    def import_json(self, path: Path | str) -> int:
        """Add the messages of a JSON Lines file (one transaction); returns the new rows."""
        rows = []
        with open(path) as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    rows.append(_row_from_json(line, where=f"{path}:{number}"))
        return self._insert(rows)


def _row_from_json(line: str, where: str) -> tuple:
    try:
        document = json.loads(line)
        message = document["message"]
        vector = np.asarray(message["value"], dtype=np.float32).reshape(-1)
        client, mode, stamp = str(message["clientID"]), str(message["mode"]), str(message["timestamp"])
        label = None if message.get("label") is None else int(message["label"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: not a paper-schema message ({err})") from err
    if not np.isfinite(vector).all():
        raise ValueError(f"{where}: non-finite values")
    key = document.get("key")
    if key:
        upload, row = str(key["uploadID"]), int(key["row"])
    else:  # a plain paper message: the same message imported twice is one row
        upload, row = "import:" + hashlib.sha256(line.strip().encode()).hexdigest()[:24], 0
    return (client, upload, row, label, vector.tobytes(), len(vector), mode, stamp, "import")
