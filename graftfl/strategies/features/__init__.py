"""Feature upload, "internet of autoencoders" (Salehinejad et al.): the server side.

The protocol entry (``PROTOCOL``, :func:`validate_config`, :func:`run`). One module
per concern:

- :mod:`.phases` — :class:`FeatureRun`, the four phases in order (autoencoders,
  learning-mode uploads, classifier, service mode);
- :mod:`.replies` — the checks every site reply passes before it is used;
- :mod:`.tables` — the pooled service-mode tables (Table I δ, Table II accuracy);
- :mod:`.store` — the SQLite feature store the uploads are committed to;
- :mod:`.classifier` — the served classifier and the online retrain loop.

The HTTP prediction service and ``graftfl serve`` / ``graftfl predict`` live in
:mod:`graftfl.commands` (the cli layer), which reads a finished run's files.
"""

from __future__ import annotations

import logging

from flwr.serverapp import Grid

from graftfl.protocols import ServerProtocol
from graftfl.strategies.features.classifier import OnlineTrainer
from graftfl.strategies.features.phases import MESSAGE_TYPE, PROTOCOL, STORE_FILE, UPLOAD_ATTEMPTS, FeatureRun
from graftfl.strategies.features.replies import client_id_of, upload_id_of
from graftfl.strategies.features.tables import service_tables, write_tables
from graftfl.strategies.utils import ServerRun, require_choice

logger = logging.getLogger(__name__)

__all__ = [
    "AE_TRAINING",
    "CLASSIFIER_MODES",
    "MESSAGE_TYPE",
    "PROTOCOL",
    "STORE_FILE",
    "UPLOAD_ATTEMPTS",
    "FeatureRun",
    "client_id_of",
    "run",
    "service_tables",
    "upload_id_of",
    "validate_config",
    "write_tables",
]

AE_TRAINING = ("local", "federated", "public")
CLASSIFIER_MODES = ("offline", "online")


def validate_config(cfg) -> None:
    """Refuse a features config the run could not carry out; the message names what is valid.

    Raises
    ------
    ValueError
        An unknown mode, a count below 1, ``public`` without leftover images, DP-SGD,
        or ``resume``.
    """
    protocol = cfg.protocol
    autoencoder = protocol.autoencoder
    require_choice("protocol.autoencoder.training", autoencoder.training, AE_TRAINING)
    require_choice("protocol.classifier.mode", protocol.classifier.mode, CLASSIFIER_MODES)
    counts = [(f"protocol.{key}", protocol[key]) for key in ("latent_dim", "conv_channels", "chunk_size")]
    counts += [(f"protocol.autoencoder.{key}", autoencoder[key]) for key in ("batch_size", "epochs", "rounds", "local_epochs")]
    for name, value in [*counts, ("protocol.public_samples", protocol.public_samples)]:
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for key in ("epochs", "batch_size", "retrain_every"):
        if int(protocol.classifier[key]) < 1:
            raise ValueError(f"protocol.classifier.{key} must be >= 1, got {protocol.classifier[key]}")
    if autoencoder.training == "public" and str(cfg.dataset.get("name")) == "site":
        raise ValueError("protocol.autoencoder.training=public trains at the server on images no site holds; with dataset=site the server "
                         "holds none: use local or federated")
    if autoencoder.training == "public" and not cfg.partition.get("samples_per_client"):
        raise ValueError(
            "protocol.autoencoder.training=public trains on training images outside every site's partition: "
            "set partition.samples_per_client (e.g. 1000) so some are left over"
        )
    if cfg.privacy.name != "none":
        raise ValueError(f"protocol=features does not support privacy={cfg.privacy.name}: the sites' autoencoders "
                         "train without DP-SGD and the uploaded latents are not noised (use privacy=none)")
    if cfg.resume:
        raise ValueError("protocol=features cannot resume a run: a second autoencoder phase would put new latents "
                         "in another space than the stored ones (the store itself survives a crash; start a new run)")


def run(grid: Grid, run: ServerRun) -> dict:
    """Autoencoders, learning-mode uploads, classifier, service mode; returns summary fields."""
    features = FeatureRun(grid, run)
    protocol = run.cfg.protocol
    autoencoder = features.prepare_autoencoders()
    if autoencoder is not None:  # audit.record: the server holds this autoencoder (federated / public)
        run.audit.keep_model("autoencoder", autoencoder.to_torch_state_dict())
    trainer = None
    if protocol.classifier.mode == "online":
        trainer = OnlineTrainer(features.store, features.served, int(protocol.classifier.retrain_every), run.num_classes, features.classifier_kwargs())
        trainer.start()
    records = features.upload_all(autoencoder, trainer)
    logger.info("[features] %d records in the store", records)
    if trainer is not None:
        trainer.finish()
        features.log_retrains(trainer)
    else:
        features.train_offline()
    features.save_classifier()
    tables = features.service_round()
    write_tables(run.run_dir, tables, run.cfg)
    features.store.close()
    logger.info("[features] service-mode accuracy %.4f, reconstruction error %.4f", tables["accuracy"], tables["reconstruction_error"])
    return {
        "ae_training": protocol.autoencoder.training,
        "classifier_mode": protocol.classifier.mode,
        "store_records": records,
        "reconstruction_error": tables["reconstruction_error"],
        "per_class_accuracy": tables["per_class_accuracy"],
        "figures": tables["figures"],
        **features.rejection_counts(),
    }


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
