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
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from graftfl.core.autoencoder import conv_ae, save_classifier, train_autoencoder, train_classifier
from graftfl.server_app.feature_service import CLASSIFIER_FILE, OnlineTrainer, ServedClassifier
from graftfl.server_app.feature_store import Chunk, FeatureStore
from graftfl.strategies.utils import ServerRun, arrays_nbytes, require_choice, wait_for_nodes

PROTOCOL = "features"
AE_TRAINING = ("local", "federated", "public")
CLASSIFIER_MODES = ("offline", "online")
STORE_FILE = "features.db"
MESSAGE_TYPE = f"train.{PROTOCOL}"


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
        self.store = FeatureStore(run.run_dir / STORE_FILE, str(self.protocol.store_synchronous))
        self.served = ServedClassifier()
        self.round = 0
        self.acknowledged: dict[int, list[str]] = {node: [] for node in self.nodes}
        self.site_of: dict[int, str] = {}
        self.run_dir = str(run.run_dir.resolve())

    # ------------------------------------------------------------ plumbing ---

    def message(self, node: int, message_type: str, records: dict | None = None, **config) -> Message:
        config_record = self.run.config_record(run_dir=self.run_dir, acknowledged=json.dumps(self.acknowledged[node]), **config)
        return Message(RecordDict({"config": config_record, **(records or {})}), dst_node_id=node, message_type=message_type)

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Send, wait, and keep the good replies (a failed site is reported and skipped)."""
        good = []
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.timeout_s):
            if reply.has_error():
                print(f"[features] site node {reply.metadata.src_node_id} failed: {reply.error.reason}", flush=True)
            else:
                good.append(reply)
        return good

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
            print(f"[features] federated autoencoder round {server_round}/{self.protocol.ae_rounds}", flush=True)
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
        """Ask every site for its chunks, one message per chunk, until all are stored."""
        next_chunk = {node: 0 for node in self.nodes}
        attempts: dict[tuple[int, int], int] = {}
        while next_chunk:
            messages = []
            for node, chunk in next_chunk.items():
                records = {"arrays": autoencoder} if chunk == 0 and autoencoder is not None else None
                messages.append(self.message(node, MESSAGE_TYPE, records, phase="upload", chunk=chunk, chunk_size=int(self.protocol.chunk_size), upload_id=f"chunk-{chunk:05d}"))
            bytes_down = arrays_nbytes(autoencoder) * sum(1 for c in next_chunk.values() if c == 0) if autoencoder is not None else 0
            replies = self.exchange(messages)
            stored, new_rows, bytes_up = 0, 0, 0
            for reply in replies:
                node = reply.metadata.src_node_id
                chunk = self.chunk_from(reply)
                new_rows += self.store.ingest_chunk(chunk)  # committed: now it may be acknowledged
                stored += len(chunk.labels)
                bytes_up += arrays_nbytes(reply.content["arrays"])
                self.acknowledged[node] = [f"{chunk.client_id}/{chunk.upload_id}"]
                self.site_of[node] = chunk.client_id
                following = next_chunk[node] + 1
                if following >= int(reply.content["upload"]["num_chunks"]):
                    del next_chunk[node]
                else:
                    next_chunk[node] = following
            for node in [n for n in next_chunk if n not in {r.metadata.src_node_id for r in replies}]:
                key = (node, next_chunk[node])
                attempts[key] = attempts.get(key, 0) + 1
                if attempts[key] >= 3:  # a site that keeps failing is left out, the others go on
                    print(f"[features] giving up on node {node} after 3 failed uploads of chunk {next_chunk[node]}", flush=True)
                    del next_chunk[node]
            self.log(phase="upload", records=stored, new_records=new_rows, duplicates=stored - new_rows, store_records=self.store.count(), bytes_up=bytes_up, bytes_down=bytes_down)
            self.log_retrains(trainer)
        return self.store.count()

    def chunk_from(self, reply: Message) -> Chunk:
        arrays = reply.content["arrays"].to_torch_state_dict()
        upload = reply.content["upload"]
        return Chunk(
            client_id=str(upload["client_id"]),
            upload_id=str(upload["upload_id"]),
            first_row=int(upload["first_row"]),
            labels=arrays["labels"].numpy(),
            vectors=arrays["latents"].numpy(),
            message_id=str(reply.metadata.message_id),
        )

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
        answers, bytes_up, served_samples = [], 0, 0
        for reply in queries:
            latents = reply.content["arrays"].to_torch_state_dict()["latents"]
            predictions = torch.from_numpy(self.served.predict(latents.numpy())).long()
            bytes_up += arrays_nbytes(reply.content["arrays"])
            served_samples += len(predictions)
            answers.append(self.message(reply.metadata.src_node_id, f"evaluate.{PROTOCOL}", {"arrays": ArrayRecord({"predictions": predictions})}, mode="service"))
        scored = self.exchange(answers)
        bytes_down = sum(arrays_nbytes(m.content["arrays"]) for m in answers)
        tables = service_tables([dict(reply.content["metrics"]) for reply in scored], self.run.data.num_classes)
        figures = sorted(str(reply.content["files"]["figure"]) for reply in scored if str(reply.content["files"]["figure"]))
        self.log(
            phase="service",
            accuracy=tables["accuracy"],
            per_class_accuracy=tables["per_class_accuracy"],
            reconstruction_error=tables["reconstruction_error"],
            per_class_reconstruction_error=tables["per_class_reconstruction_error"],
            served_samples=served_samples,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            classifier_version=self.served.version,
        )
        return {**tables, "figures": figures}


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
    print(f"[features] {records} records in the store", flush=True)
    if trainer is not None:
        trainer.finish()
        features.log_retrains(trainer)
    else:
        features.train_offline()
    features.save_classifier()
    tables = features.service_round()
    write_tables(run.run_dir, tables, run.cfg)
    features.store.close()
    print(f"[features] service-mode accuracy {tables['accuracy']:.4f}, reconstruction error {tables['reconstruction_error']:.4f}", flush=True)
    return {
        "ae_training": protocol.ae_training,
        "classifier_mode": protocol.classifier.mode,
        "store_records": records,
        "reconstruction_error": tables["reconstruction_error"],
        "per_class_accuracy": tables["per_class_accuracy"],
        "figures": tables["figures"],
    }
