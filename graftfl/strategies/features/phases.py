"""The four phases of a ``protocol=features`` run, driven by :class:`FeatureRun`.

1. Autoencoders (:mod:`.autoencoders`, ``protocol.autoencoder.training``): ``local`` — each site trains its
   own (the paper); ``federated`` — ``autoencoder.rounds`` FedAvg rounds (Flower's
   FedAvg aggregation) so all latents share one space; ``public`` — the server trains
   one on images outside every site's partition and hands it to the sites.
2. Learning mode: each site uploads ``(latent, label)`` in chunks, one Flower message
   per chunk; each chunk is committed to the SQLite feature store before it is
   acknowledged (in the site's next message).
3. Classifier: the paper's MLP trained from the store, ``offline`` once after the
   uploads or ``online`` by a background thread every ``retrain_every`` records.
4. Service mode: sites send test latents (``query.features``), the server answers
   with labels (``evaluate.features``), the sites score them; the run writes the
   per-class accuracy and reconstruction error (:mod:`.tables`).

Every reply is checked (:mod:`.replies`, the store's :class:`ChunkRules`) before it
touches the store or the classifier; a bad reply is refused, logged, listed under
``rejected`` in its metrics row and counted in the summary, and the run goes on with
the other sites.

Traffic (``bytes_up``, ``bytes_down`` of each row) is the serialized size of every
Flower message exchanged since the previous row, config included, error replies and
refused replies too (:func:`graftfl.strategies.wire_bytes.message_nbytes`); the features
protocol has no data plane.
"""

from __future__ import annotations

import logging
import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from graftfl.config import eval_where
from graftfl.core.autoencoder import save_classifier, train_classifier
from graftfl.core.meter import metrics_row
from graftfl.strategies.features.autoencoders import MESSAGE_TYPE, PROTOCOL, AutoencoderPhase
from graftfl.strategies.features.classifier import CLASSIFIER_FILE, OnlineTrainer, ServedClassifier
from graftfl.strategies.features.replies import (
    client_id_of,
    figure_of,
    reply_arrays,
    reply_config,
    require_claims,
    score_problem,
    upload_id_of,
)
from graftfl.strategies.features.store import Chunk, ChunkRules, FeatureStore, InvalidChunk
from graftfl.strategies.features.tables import service_tables
from graftfl.strategies.utils import ServerRun, wait_for_nodes
from graftfl.strategies.wire_bytes import message_nbytes, messages_nbytes

logger = logging.getLogger(__name__)
STORE_FILE = "features.db"
UPLOAD_ATTEMPTS = 3  # failed or rejected tries of one chunk before a site is left out


class FeatureRun(AutoencoderPhase):
    """One ``protocol=features`` run: the phases above, in order.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation or deployment).
    run : ServerRun
        Config, run directory, recorder.
    """

    def __init__(self, grid: Grid, run: ServerRun):
        self.grid, self.run, self.cfg = grid, run, run.cfg
        self.protocol = run.cfg.protocol
        self.nodes = wait_for_nodes(grid, run.cfg.num_clients, run.cfg.timeout_s)
        self.rules = ChunkRules(latent_dim=int(self.protocol.latent_dim), num_classes=run.num_classes, max_rows=int(self.protocol.chunk_size))
        self.store = FeatureStore(run.run_dir / STORE_FILE, str(self.protocol.store_synchronous), rules=self.rules)
        run.audit.point_to("feature_store", STORE_FILE)  # audit.record: the store already holds the latents and labels
        self.served = ServedClassifier()
        self.round = 0
        self.acknowledged: dict[int, list[str]] = {node: [] for node in self.nodes}
        self.rejections: list[dict] = []
        self.run_dir = str(run.run_dir.resolve())
        self.bytes_down = 0  # serialized messages sent since the last metrics row
        self.bytes_up = 0  # serialized replies received since the last metrics row

    # ------------------------------------------------------------ plumbing ---

    def message(self, node: int, message_type: str, records: dict | None = None, **config) -> Message:
        """A message of ``message_type`` to ``node`` carrying the run config, the node's acknowledged uploads and ``config``."""
        config_record = self.run.config_record(run_dir=self.run_dir, client_id=client_id_of(node), acknowledged=json.dumps(self.acknowledged[node]), **config)
        return Message(RecordDict({"config": config_record, **(records or {})}), dst_node_id=node, message_type=message_type)

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Send, wait, and keep the good replies (a failed site is reported and skipped)."""
        good = []
        self.bytes_down += messages_nbytes(messages)
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.timeout_s):
            self.bytes_up += message_nbytes(reply)  # every reply travelled, also a failure or a refused one
            if reply.has_error():
                logger.warning(f"[features] site node {reply.metadata.src_node_id} failed: {reply.error.reason}")
            else:
                good.append(reply)
        return good

    def reject(self, node: int, phase: str, reason: str, **where) -> dict:
        """Record and print a refused reply; returns its entry for the metrics row."""
        entry = {"phase": phase, "node": int(node), "client_id": client_id_of(node), **where, "reason": reason}
        logger.warning(f"[features] {phase} reply of {client_id_of(node)} rejected: {reason}")
        self.rejections.append(entry)
        return entry

    def rejection_counts(self) -> dict:
        """Summary fields: rejected autoencoder replies, upload chunks and service replies, and every rejection with its reason."""
        counts = {phase: sum(1 for entry in self.rejections if entry["phase"] == phase) for phase in ("autoencoder", "upload", "service")}
        return {"rejected_autoencoder_replies": counts["autoencoder"], "rejected_chunks": counts["upload"],
                "rejected_service_replies": counts["service"], "rejections": list(self.rejections)}

    def log(self, **row) -> dict:
        """Log one metrics row, with the traffic of every message exchanged since the previous row."""
        self.round += 1
        wall_s = self.run.round_seconds()
        base = metrics_row(self.round, accuracy=None, loss=None, bytes_up=self.bytes_up, bytes_down=self.bytes_down, client_flops=0, wall_s=wall_s)
        self.bytes_up = self.bytes_down = 0
        return self.run.recorder.log_round({**base, **row})

    # ------------------------------------------------------- learning mode ---

    def upload_all(self, autoencoder: ArrayRecord | None, trainer: OnlineTrainer | None) -> int:
        """Ask every site for its chunks, one message per chunk, until all are stored (or given up)."""
        next_chunk = {node: 0 for node in self.nodes}
        attempts: dict[tuple[int, int], int] = {}
        while next_chunk:
            messages = [self.upload_message(node, chunk, autoencoder) for node, chunk in next_chunk.items()]
            replies = self.exchange(messages)
            stored, new_rows, rejected, accepted = 0, 0, [], set()
            for reply in replies:
                node = reply.metadata.src_node_id
                try:
                    chunk, num_chunks = self.chunk_from(reply, next_chunk[node])
                    new_rows += self.store.ingest_chunk(chunk)  # committed: now it may be acknowledged
                except InvalidChunk as err:
                    rejected.append(self.reject(node, "upload", str(err), chunk=next_chunk[node]))
                    continue
                accepted.add(node)
                stored += len(chunk.labels)
                self.acknowledged[node] = [f"{chunk.client_id}/{chunk.upload_id}"]
                next_chunk[node] += 1
                if next_chunk[node] >= num_chunks:
                    del next_chunk[node]
            self.retry_or_give_up(next_chunk, accepted, attempts)
            self.log(phase="upload", records=stored, new_records=new_rows, duplicates=stored - new_rows, store_records=self.store.count(), rejected=rejected)
            self.log_retrains(trainer)
        return self.store.count()

    def upload_message(self, node: int, chunk: int, autoencoder: ArrayRecord | None) -> Message:
        """The upload request for ``chunk`` of ``node`` (the first chunk also carries the autoencoder weights)."""
        records = {"arrays": autoencoder} if chunk == 0 and autoencoder is not None else None
        return self.message(node, MESSAGE_TYPE, records, phase="upload", chunk=chunk, chunk_size=int(self.protocol.chunk_size), upload_id=upload_id_of(chunk))

    def retry_or_give_up(self, next_chunk: dict[int, int], accepted: set[int], attempts: dict[tuple[int, int], int]) -> None:
        """Count a failed try for every pending site whose chunk was not stored; drop a site after ``UPLOAD_ATTEMPTS``."""
        for node in [n for n in next_chunk if n not in accepted]:
            key = (node, next_chunk[node])
            attempts[key] = attempts.get(key, 0) + 1
            if attempts[key] >= UPLOAD_ATTEMPTS:  # a site that keeps failing is left out, the others go on
                logger.warning(f"[features] giving up on node {node} after {UPLOAD_ATTEMPTS} failed uploads of chunk {next_chunk[node]}")
                del next_chunk[node]

    def chunk_from(self, reply: Message, chunk_number: int) -> tuple[Chunk, int]:
        """The chunk a reply carries, checked, keyed by the server's names; and the site's chunk count.

        Parameters
        ----------
        reply : Message
            A site's reply to ``upload_message(node, chunk_number, ...)``.
        chunk_number : int
            The chunk the server asked this site for.

        Returns
        -------
        tuple[Chunk, int]
            The chunk (``client_id`` from the node id, ``upload_id`` and ``first_row``
            from the request) and the number of chunks the site says it has.

        Raises
        ------
        InvalidChunk
            The reply is malformed, claims another site or chunk, or its rows break
            the store's rules.
        """
        node = reply.metadata.src_node_id
        expected = {"client_id": client_id_of(node), "upload_id": upload_id_of(chunk_number), "first_row": chunk_number * int(self.protocol.chunk_size)}
        upload = reply_config(reply, "upload")
        require_claims(upload, expected)
        num_chunks = upload.get("num_chunks")
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks <= chunk_number:
            raise InvalidChunk(f"num_chunks={num_chunks!r} does not leave room for chunk {chunk_number}")
        arrays = reply_arrays(reply, ("latents", "labels"))
        problem = self.rules.problem(arrays["latents"], arrays["labels"])
        if problem:
            raise InvalidChunk(problem)
        chunk = Chunk(labels=arrays["labels"], vectors=arrays["latents"], message_id=str(reply.metadata.message_id), **expected)
        return chunk, num_chunks

    # ---------------------------------------------------------- classifier ---

    def classifier_kwargs(self) -> dict:
        """The classifier training settings from ``protocol.classifier`` as keyword arguments."""
        settings = self.protocol.classifier
        return {
            "epochs": int(settings.epochs),
            "batch_size": int(settings.batch_size),
            "lr": float(settings.lr),
            "hidden": list(settings.hidden),
            "seed": int(self.cfg.seed),
            "device": self.run.device,
        }

    def log_retrains(self, trainer: OnlineTrainer | None) -> None:
        """Record a metrics row for each retrain the online trainer did since the last call."""
        for row in trainer.drain_rows() if trainer else []:
            self.log(phase="classifier", classifier_mode="online", **row)

    def train_offline(self) -> None:
        """Train the classifier once on the whole store (offline mode), serve it and record its metrics row."""
        started = time.monotonic()
        x, y = self.store.load()
        if not len(y):
            raise RuntimeError(f"the feature store is empty: no site's upload was accepted ({len(self.rejections)} rejected, see the upload rows' 'rejected')")
        model, metrics = train_classifier(torch.from_numpy(x), torch.from_numpy(y), self.run.num_classes, **self.classifier_kwargs())
        version = self.served.swap(model)
        self.log(phase="classifier", classifier_mode="offline", records=len(y), classifier_version=version, retrain_s=time.monotonic() - started, **metrics)

    def save_classifier(self) -> Path:
        """Save the served classifier into the run directory; returns the file."""
        model, version = self.served.model, self.served.version
        settings = self.protocol.classifier
        return save_classifier(self.run.run_dir / CLASSIFIER_FILE, model, int(self.protocol.latent_dim), self.run.num_classes, list(settings.hidden), version)

    # -------------------------------------------------------- service mode ---

    def service_round(self) -> dict:
        """Test latents in, labels out; the sites score the answers and report Eq. 9."""
        self.run.round_seconds()
        queries = self.exchange([self.message(node, f"query.{PROTOCOL}", mode="service") for node in self.nodes])
        answers, answered, rejected = [], {}, []
        for reply in queries:
            node = reply.metadata.src_node_id
            try:
                latents = self.service_latents(reply)
            except InvalidChunk as err:
                rejected.append(self.reject(node, "service", str(err)))
                continue
            predictions = torch.from_numpy(self.served.predict(latents)).long()
            answered[node] = len(predictions)
            answers.append(self.message(node, f"evaluate.{PROTOCOL}", {"arrays": ArrayRecord({"predictions": predictions})}, mode="service"))
        scored = []
        for reply in self.exchange(answers):
            problem = score_problem(reply, self.run.num_classes, answered[reply.metadata.src_node_id])
            if problem:
                rejected.append(self.reject(reply.metadata.src_node_id, "service", problem))
            else:
                scored.append(reply)
        tables = service_tables([dict(reply.content["metrics"]) for reply in scored], self.run.num_classes)
        self.log(
            phase="service",
            accuracy=tables["accuracy"],
            per_class_accuracy=tables["per_class_accuracy"],
            reconstruction_error=tables["reconstruction_error"],
            per_class_reconstruction_error=tables["per_class_reconstruction_error"],
            served_samples=sum(answered.values()),
            classifier_version=self.served.version,
            rejected=rejected,
        )
        return {**tables, "figures": sorted(figure for figure in map(figure_of, scored) if figure)}

    def service_latents(self, reply: Message) -> np.ndarray:
        """A site's service-mode latents, checked (name, latent length, finite, at most its test share).

        Raises
        ------
        InvalidChunk
            The reply is malformed, claims another site, or its latents break the rules.
        """
        require_claims(reply_config(reply, "upload"), {"client_id": client_id_of(reply.metadata.src_node_id)})
        latents = reply_arrays(reply, ("latents",))["latents"]
        rules = ChunkRules(latent_dim=self.rules.latent_dim, max_rows=self.test_share())
        problem = rules.problem(latents)
        if problem:
            raise InvalidChunk(problem)
        return latents.astype(np.float32)

    def test_share(self) -> int:
        """The most test images one site holds (``site_test_indices`` splits the test selection evenly)."""
        if self.run.site_data or eval_where(self.cfg) == "site":  # each site's own held-out rows: the server cannot count them
            return self.run.max_eval_rows() if self.run.site_data else len(self.run.raw.train_y)
        size, available = self.cfg.dataset.get("test_size"), len(self.run.raw.test_y)
        count = min(int(size), available) if size else available
        return -(-count // int(self.cfg.num_clients))
