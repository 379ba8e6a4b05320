"""Feature upload, "internet of autoencoders" (Salehinejad et al.): the server side.

1. Autoencoders (``protocol.ae_training``): ``local`` — each site trains its own
   (the paper); ``federated`` — ``ae_rounds`` FedAvg rounds (Flower's FedAvg
   aggregation) so all latents share one space; ``public`` — the server trains one
   on images outside every site's partition and hands it to the sites.
2. Learning mode: each site uploads ``(latent, label)`` in chunks, one Flower message
   per chunk; each chunk is committed to the SQLite feature store before it is
   acknowledged (in the site's next message).
3. Classifier: the paper's MLP trained from the store, ``offline`` once after the
   uploads or ``online`` by a background thread every ``retrain_every`` records.
4. Service mode: sites send test latents (``query.features``), the server answers
   with labels (``evaluate.features``), the sites score them; the run writes the
   per-class accuracy (Table II), the per-class reconstruction error δ (Table I) and
   the sites' original/latent/reconstruction grids (Fig. 3-4).

Sites are not trusted. The server names each site after its Flower node id
(:func:`client_id_of`) and tells it the name; the store keys rows by that name, never
by what a reply claims. Every upload and service reply is checked (the store's
:class:`ChunkRules`, the names and row offsets the server asked for, the service
scores' shapes and totals) before it touches the store or the classifier; a bad
reply is refused, logged, listed under ``rejected`` in its metrics row and counted
in the summary, and the run goes on with the other sites.
"""

from __future__ import annotations

import logging
import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from graftfl.core.autoencoder import conv_ae, save_classifier, train_autoencoder, train_classifier
from graftfl.protocols import ServerProtocol
from graftfl.server_app.feature_service import CLASSIFIER_FILE, OnlineTrainer, ServedClassifier
from graftfl.server_app.feature_store import Chunk, ChunkRules, FeatureStore, InvalidChunk
from graftfl.strategies.utils import ServerRun, arrays_nbytes, require_choice, wait_for_nodes

PROTOCOL = "features"
logger = logging.getLogger(__name__)
AE_TRAINING = ("local", "federated", "public")
CLASSIFIER_MODES = ("offline", "online")
STORE_FILE = "features.db"
MESSAGE_TYPE = f"train.{PROTOCOL}"
UPLOAD_ATTEMPTS = 3  # failed or rejected tries of one chunk before a site is left out
SCORE_FIELDS = ("correct_by_class", "count_by_class", "error_sum_by_class", "error_count_by_class")


def client_id_of(node: int) -> str:
    """The ``clientID`` the server gives the site on Flower node ``node`` (store key, acknowledgements)."""
    return f"node-{node}"


def upload_id_of(chunk: int) -> str:
    """The ``upload_id`` the server asks for (with ``client_id`` and the row, the store's unique key)."""
    return f"chunk-{chunk:05d}"


def validate_config(cfg) -> None:
    protocol = cfg.protocol
    require_choice("protocol.ae_training", protocol.ae_training, AE_TRAINING)
    require_choice("protocol.classifier.mode", protocol.classifier.mode, CLASSIFIER_MODES)
    for key in ("latent_dim", "conv_channels", "chunk_size", "ae_batch_size", "ae_epochs", "ae_rounds", "ae_local_epochs", "public_samples"):
        if int(protocol[key]) < 1:
            raise ValueError(f"protocol.{key} must be >= 1, got {protocol[key]}")
    for key in ("epochs", "batch_size", "retrain_every"):
        if int(protocol.classifier[key]) < 1:
            raise ValueError(f"protocol.classifier.{key} must be >= 1, got {protocol.classifier[key]}")
    if protocol.ae_training == "public" and not cfg.partition.get("samples_per_client"):
        raise ValueError(
            "protocol.ae_training=public trains on training images outside every site's partition: "
            "set partition.samples_per_client (e.g. 1000) so some are left over"
        )
    if cfg.privacy.name != "none":
        raise ValueError(f"protocol=features does not support privacy={cfg.privacy.name}: the sites' autoencoders "
                         "train without DP-SGD and the uploaded latents are not noised (use privacy=none)")
    if cfg.resume:
        raise ValueError("protocol=features cannot resume a run: a second autoencoder phase would put new latents "
                         "in another space than the stored ones (the store itself survives a crash; start a new run)")


class FeatureRun:
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
        self.rules = ChunkRules(latent_dim=int(self.protocol.latent_dim), num_classes=run.data.num_classes, max_rows=int(self.protocol.chunk_size))
        self.store = FeatureStore(run.run_dir / STORE_FILE, str(self.protocol.store_synchronous), rules=self.rules)
        self.served = ServedClassifier()
        self.round = 0
        self.acknowledged: dict[int, list[str]] = {node: [] for node in self.nodes}
        self.rejections: list[dict] = []
        self.run_dir = str(run.run_dir.resolve())

    # ------------------------------------------------------------ plumbing ---

    def message(self, node: int, message_type: str, records: dict | None = None, **config) -> Message:
        config_record = self.run.config_record(run_dir=self.run_dir, client_id=client_id_of(node), acknowledged=json.dumps(self.acknowledged[node]), **config)
        return Message(RecordDict({"config": config_record, **(records or {})}), dst_node_id=node, message_type=message_type)

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Send, wait, and keep the good replies (a failed site is reported and skipped)."""
        good = []
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.timeout_s):
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
        """Summary fields: rejected upload chunks and service replies, and every rejection with its reason."""
        uploads = sum(1 for entry in self.rejections if entry["phase"] == "upload")
        return {"rejected_chunks": uploads, "rejected_service_replies": len(self.rejections) - uploads, "rejections": list(self.rejections)}

    def log(self, **row) -> dict:
        self.round += 1
        base = {"round": self.round, "accuracy": None, "loss": None, "bytes_up": 0, "bytes_down": 0, "client_flops": 0, "wall_s": self.run.round_seconds()}
        return self.run.recorder.log_round({**base, **row})

    # -------------------------------------------------------- autoencoders ---

    def prepare_autoencoders(self) -> ArrayRecord | None:
        """Train the autoencoder(s); returns the weights to hand to the sites (None: local)."""
        mode = self.protocol.ae_training
        self.run.round_seconds()
        if mode == "local":
            replies = self.exchange([self.message(node, MESSAGE_TYPE, phase="autoencoder") for node in self.nodes])
            self.log_autoencoder_round(replies, bytes_down=0)
            return None
        if mode == "federated":
            return self.federated_autoencoder()
        return self.public_autoencoder()

    def log_autoencoder_round(self, replies: list[Message], bytes_down: int, bytes_up: int = 0) -> None:
        metrics = sorted((dict(reply.content["metrics"]) for reply in replies), key=lambda m: m["partition-id"])
        losses = [m["ae_loss"] for m in metrics]
        self.log(
            phase="autoencoder",
            ae_training=self.protocol.ae_training,
            ae_loss=float(np.mean(losses)) if losses else None,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            client_flops=sum(m["client_flops"] for m in metrics),
            clients=[int(m["partition-id"]) for m in metrics],
            client_ae_loss=losses,
        )

    def federated_autoencoder(self) -> ArrayRecord:
        model = conv_ae(self.run.data.input_shape, latent_dim=int(self.protocol.latent_dim), channels=int(self.protocol.conv_channels))
        torch.manual_seed(self.cfg.seed)
        arrays = ArrayRecord(model.state_dict())
        aggregator = FedAvg()  # Flower's weighted average ("num-examples") of the replies' ArrayRecords
        for server_round in range(1, int(self.protocol.ae_rounds) + 1):
            messages = [self.message(node, MESSAGE_TYPE, {"arrays": arrays}, phase="autoencoder", **{"server-round": server_round}) for node in self.nodes]
            replies = self.exchange(messages)
            if not replies:
                raise RuntimeError("no site returned autoencoder weights")
            arrays, _ = aggregator.aggregate_train(server_round, replies)
            self.log_autoencoder_round(replies, bytes_down=arrays_nbytes(arrays) * len(messages), bytes_up=sum(arrays_nbytes(r.content["arrays"]) for r in replies))
            logger.info(f"[features] federated autoencoder round {server_round}/{self.protocol.ae_rounds}")
        return arrays

    def public_autoencoder(self) -> ArrayRecord:
        """Train on training images no site holds (the draw ``partition_indices`` leaves over)."""
        data, protocol = self.run.data, self.protocol
        assigned = int(self.cfg.partition.samples_per_client) * int(self.cfg.num_clients)
        order = np.random.default_rng(self.cfg.seed).permutation(len(data.train_y))
        public = torch.from_numpy(order[assigned : assigned + int(protocol.public_samples)])
        if len(public) == 0:
            raise ValueError(f"no training images are left outside the {assigned} the sites hold; lower partition.samples_per_client")
        torch.manual_seed(self.cfg.seed)
        model = conv_ae(data.input_shape, latent_dim=int(protocol.latent_dim), channels=int(protocol.conv_channels))
        result = train_autoencoder(model, data.train_x[public], epochs=int(protocol.ae_epochs), batch_size=int(protocol.ae_batch_size), lr=float(protocol.ae_lr), device=self.run.device, seed=self.cfg.seed)
        self.log(phase="autoencoder", ae_training="public", ae_loss=result["ae_loss"], public_samples=len(public))
        return ArrayRecord(model.cpu().state_dict())

    # ------------------------------------------------------- learning mode ---

    def upload_all(self, autoencoder: ArrayRecord | None, trainer: OnlineTrainer | None) -> int:
        """Ask every site for its chunks, one message per chunk, until all are stored (or given up)."""
        next_chunk = {node: 0 for node in self.nodes}
        attempts: dict[tuple[int, int], int] = {}
        while next_chunk:
            messages = [self.upload_message(node, chunk, autoencoder) for node, chunk in next_chunk.items()]
            bytes_down = arrays_nbytes(autoencoder) * sum(1 for c in next_chunk.values() if c == 0) if autoencoder is not None else 0
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
            bytes_up = sum(received_bytes(reply) for reply in replies)
            self.log(phase="upload", records=stored, new_records=new_rows, duplicates=stored - new_rows, store_records=self.store.count(), bytes_up=bytes_up, bytes_down=bytes_down, rejected=rejected)
            self.log_retrains(trainer)
        return self.store.count()

    def upload_message(self, node: int, chunk: int, autoencoder: ArrayRecord | None) -> Message:
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
        for row in trainer.drain_rows() if trainer else []:
            self.log(phase="classifier", classifier_mode="online", **row)

    def train_offline(self) -> None:
        started = time.monotonic()
        x, y = self.store.load()
        if not len(y):
            raise RuntimeError(f"the feature store is empty: no site's upload was accepted ({len(self.rejections)} rejected, see the upload rows' 'rejected')")
        model, metrics = train_classifier(torch.from_numpy(x), torch.from_numpy(y), self.run.data.num_classes, **self.classifier_kwargs())
        version = self.served.swap(model)
        self.log(phase="classifier", classifier_mode="offline", records=len(y), classifier_version=version, retrain_s=time.monotonic() - started, **metrics)

    def save_classifier(self) -> Path:
        model, version = self.served.model, self.served.version
        settings = self.protocol.classifier
        return save_classifier(self.run.run_dir / CLASSIFIER_FILE, model, int(self.protocol.latent_dim), self.run.data.num_classes, list(settings.hidden), version)

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
            problem = score_problem(reply, self.run.data.num_classes, answered[reply.metadata.src_node_id])
            if problem:
                rejected.append(self.reject(reply.metadata.src_node_id, "service", problem))
            else:
                scored.append(reply)
        tables = service_tables([dict(reply.content["metrics"]) for reply in scored], self.run.data.num_classes)
        self.log(
            phase="service",
            accuracy=tables["accuracy"],
            per_class_accuracy=tables["per_class_accuracy"],
            reconstruction_error=tables["reconstruction_error"],
            per_class_reconstruction_error=tables["per_class_reconstruction_error"],
            served_samples=sum(answered.values()),
            bytes_up=sum(received_bytes(reply) for reply in queries),
            bytes_down=sum(arrays_nbytes(m.content["arrays"]) for m in answers),
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
        size, available = self.cfg.dataset.get("test_size"), len(self.run.data.test_y)
        count = min(int(size), available) if size else available
        return -(-count // int(self.cfg.num_clients))


def reply_config(reply: Message, name: str) -> ConfigRecord:
    """The reply's ConfigRecord ``name``; ``InvalidChunk`` when it has none."""
    record = reply.content[name] if name in reply.content else None
    if not isinstance(record, ConfigRecord):
        raise InvalidChunk(f"reply carries no '{name}' config record")
    return record


def require_claims(record: ConfigRecord, expected: dict) -> None:
    """Raise ``InvalidChunk`` unless ``record`` holds exactly the ``expected`` values (names, offsets)."""
    for key, value in expected.items():
        claimed = record.get(key)
        if claimed != value or type(claimed) is not type(value):
            raise InvalidChunk(f"claims {key}={claimed!r}, the server expects {value!r}")


def reply_arrays(reply: Message, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of the reply's ``arrays`` record as numpy; ``InvalidChunk`` when missing or undecodable."""
    record = reply.content["arrays"] if "arrays" in reply.content else None
    if not isinstance(record, ArrayRecord):
        raise InvalidChunk("reply carries no 'arrays' record")
    missing = [name for name in names if name not in record]
    if missing:
        raise InvalidChunk(f"reply lacks arrays {missing}")
    try:
        return {name: record[name].numpy() for name in names}
    except (ValueError, TypeError) as err:
        raise InvalidChunk(f"undecodable arrays: {err}") from err


def received_bytes(reply: Message) -> int:
    """Payload bytes of the reply's ``arrays`` (0 when it has none or they do not decode)."""
    try:
        return arrays_nbytes(reply.content["arrays"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0


def score_problem(reply: Message, num_classes: int, answered: int) -> str | None:
    """Why a site's service scores cannot be pooled, or None.

    Each of ``SCORE_FIELDS`` must be ``num_classes`` finite non-negative numbers, no
    class may have more correct answers than images, and the images counted must be
    the ``answered`` predictions the server sent to that site.
    """
    metrics = reply.content["metrics"] if "metrics" in reply.content else None
    if not isinstance(metrics, MetricRecord):
        return "reply carries no 'metrics' record"
    values = {}
    for key in SCORE_FIELDS:
        try:
            values[key] = np.asarray(metrics[key], dtype=np.float64) if key in metrics else None
        except (TypeError, ValueError):
            values[key] = None
        if values[key] is None or values[key].shape != (num_classes,):
            return f"{key} is not a list of {num_classes} numbers"
        if not np.isfinite(values[key]).all() or (values[key] < 0).any():
            return f"{key} holds negative or non-finite values"
    if (values["correct_by_class"] > values["count_by_class"]).any():
        return "a class has more correct answers than test images"
    if values["count_by_class"].sum() != answered:
        return f"scored {int(values['count_by_class'].sum())} test images, the server answered {answered}"
    return None


def figure_of(reply: Message) -> str:
    """The figure path a site reports ('' when none)."""
    files = reply.content["files"] if "files" in reply.content else None
    figure = files.get("figure", "") if isinstance(files, ConfigRecord) else ""
    return figure if isinstance(figure, str) else ""


def service_tables(site_metrics: list[dict], num_classes: int) -> dict:
    """Pool the sites' counts into Table I (δ per class, Eq. 9) and Table II (accuracy per class)."""

    def pooled(key: str) -> np.ndarray:
        return np.sum([np.asarray(m[key], dtype=np.float64) for m in site_metrics], axis=0) if site_metrics else np.zeros(num_classes)

    correct, count = pooled("correct_by_class"), pooled("count_by_class")
    error_sum, error_count = pooled("error_sum_by_class"), pooled("error_count_by_class")
    ratio = lambda a, b: [float(x / y) if y else None for x, y in zip(a, b)]  # noqa: E731
    return {
        "accuracy": float(correct.sum() / count.sum()) if count.sum() else None,
        "per_class_accuracy": ratio(correct, count),
        "test_samples": int(count.sum()),
        "per_class_test_samples": [int(c) for c in count],
        "reconstruction_error": float(error_sum.sum() / error_count.sum()) if error_count.sum() else None,
        "per_class_reconstruction_error": ratio(error_sum, error_count),
    }


def write_tables(run_dir: Path, tables: dict, cfg) -> None:
    """``tables.json`` plus Markdown Tables I (reconstruction error) and II (accuracy)."""
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    header = f"dataset {cfg.dataset.name}, {cfg.num_clients} sites, ae_training={cfg.protocol.ae_training}, classifier={cfg.protocol.classifier.mode}, latent_dim={cfg.protocol.latent_dim}"
    table1 = ["# Table I: reconstruction error δ per class (Eq. 9)", "", header, "", "| class | δ |", "|---|---|"]
    table1 += [f"| {c} | {fmt(v, '.4f')} |" for c, v in enumerate(tables["per_class_reconstruction_error"])]
    table1.append(f"| **overall** | **{fmt(tables['reconstruction_error'], '.4f')}** |")
    table2 = ["# Table II: classification accuracy per class (service mode)", "", header, "", "| class | test images | accuracy |", "|---|---|---|"]
    table2 += [f"| {c} | {n} | {fmt(v, '.2%')} |" for c, (n, v) in enumerate(zip(tables["per_class_test_samples"], tables["per_class_accuracy"]))]
    table2.append(f"| **total** | **{tables['test_samples']}** | **{fmt(tables['accuracy'], '.2%')}** |")
    (run_dir / "table_reconstruction.md").write_text("\n".join(table1) + "\n")
    (run_dir / "table_accuracy.md").write_text("\n".join(table2) + "\n")
    (run_dir / "tables.json").write_text(json.dumps({"setting": header, **tables}, indent=2) + "\n")


def run(grid: Grid, run: ServerRun) -> dict:
    """Autoencoders, learning-mode uploads, classifier, service mode; returns summary fields."""
    features = FeatureRun(grid, run)
    protocol = run.cfg.protocol
    autoencoder = features.prepare_autoencoders()
    trainer = None
    if protocol.classifier.mode == "online":
        trainer = OnlineTrainer(features.store, features.served, int(protocol.classifier.retrain_every), run.data.num_classes, features.classifier_kwargs())
        trainer.start()
    records = features.upload_all(autoencoder, trainer)
    logger.info(f"[features] {records} records in the store")
    if trainer is not None:
        trainer.finish()
        features.log_retrains(trainer)
    else:
        features.train_offline()
    features.save_classifier()
    tables = features.service_round()
    write_tables(run.run_dir, tables, run.cfg)
    features.store.close()
    logger.info(f"[features] service-mode accuracy {tables['accuracy']:.4f}, reconstruction error {tables['reconstruction_error']:.4f}")
    return {
        "ae_training": protocol.ae_training,
        "classifier_mode": protocol.classifier.mode,
        "store_records": records,
        "reconstruction_error": tables["reconstruction_error"],
        "per_class_accuracy": tables["per_class_accuracy"],
        "figures": tables["figures"],
        **features.rejection_counts(),
    }


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
