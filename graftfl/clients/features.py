"""Feature-upload site (Salehinejad et al.): train an autoencoder, send only latents.

Message types handled (``train.features`` carries a ``phase``):

- ``train.features`` phase ``autoencoder``: train the site's autoencoder on its own
  images (``autoencoder.training=local``: ``autoencoder.epochs``, once; ``federated``: one
  FedAvg round of ``autoencoder.local_epochs`` from the global weights sent along,
  weights returned).
- ``train.features`` phase ``upload``: learning mode. Encode the labelled partition
  and return rows ``[chunk * chunk_size, ...)`` as ``(latent, label)``. The first
  chunk message installs the final autoencoder (federated/public) and saves it to
  the site directory for ``graftfl predict``; the server's acknowledgements of
  committed chunks arrive with the next message and are kept in ``context.state``.
- ``query.features``: service mode. Encode this site's share of the test set and
  return the latents only (no labels).
- ``evaluate.features``: score the server's predicted labels against the site's own
  labels, compute the per-class reconstruction error (Eq. 9) and draw the
  original / latent / reconstruction grid into the site directory.

The autoencoder lives in ``context.state`` between messages and, once final, in
``<site-dir>/autoencoder.pt``. The site alone chooses that folder, never the
server's message (:func:`site_dir`): node config ``site-dir``; else
``$GRAFTFL_SITES_DIR/site-<id>`` (``graftfl sim`` and ``deploy-local`` set it to
``<run-dir>/sites``, every site sharing the machine); else a private temporary
folder of its own. The server never receives the encoder or decoder in ``local`` mode.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import DictConfig

from graftfl.clients.site_data import registry_test_set, site_rows, standardization_of
from graftfl.clients.utils import (
    client_device,
    config_of,
    local_data,
    module_holding,
    num_classes_of,
    partition_id_of,
    state_from,
    training_device,
)
from graftfl.config import eval_where
from graftfl.core.autoencoder import class_grid_figure, encode, reconstruction_error_by_class, save_autoencoder, train_autoencoder
from graftfl.core.defences import DefenceConfig, SiteDefences
from graftfl.core.meter import train_flops_per_sample
from graftfl.core.models import StagedModel, build_model
from graftfl.core.overlap import overlapping
from graftfl.core.split import test_selection
from graftfl.core.train import round_seed, seed_torch
from graftfl.protocols import ClientProtocol

PROTOCOL = "features"
AUTOENCODER_STATE = "features.autoencoder"
ACK_STATE = "features.acknowledged"
AUTOENCODER_FILE = "autoencoder.pt"


def site_name(partition_id: int) -> str:
    """The site's own name (its folder, figure titles, ``graftfl predict --client-id``).

    Its ``clientID`` in the server's store is the name the server gives it (the
    ``client_id`` of every server message), which the site echoes in its replies.
    """
    return f"site-{partition_id}"


SITE_DIR_NODE_CONFIG = "site-dir"
SITES_DIR_ENV = "GRAFTFL_SITES_DIR"
SITE_DIR_STATE = "features.site-dir"


def site_dir(context: Context) -> Path:
    """Where this site writes its autoencoder and figure: a folder the site chose itself.

    Node config ``site-dir``, else ``$GRAFTFL_SITES_DIR/site-<id>``, else a fresh
    private temporary folder, remembered in ``context.state`` for the run's later
    messages. A path in the server's message is never used: a server must not
    choose where a site writes.
    """
    if SITE_DIR_NODE_CONFIG in context.node_config:
        return Path(str(context.node_config[SITE_DIR_NODE_CONFIG]))
    partition_id, _ = partition_id_of(context)
    if os.environ.get(SITES_DIR_ENV):
        return Path(os.environ[SITES_DIR_ENV]) / site_name(partition_id)
    if SITE_DIR_STATE not in context.state:
        context.state[SITE_DIR_STATE] = ConfigRecord({"path": tempfile.mkdtemp(prefix=f"graftfl-{site_name(partition_id)}-")})
    return Path(str(context.state[SITE_DIR_STATE]["path"]))


def new_autoencoder(cfg: DictConfig, input_shape) -> StagedModel:
    """A fresh convolutional autoencoder with the protocol's latent size and channels."""
    return build_model("conv_ae", input_shape, 0, latent_dim=int(cfg.protocol.latent_dim), channels=int(cfg.protocol.conv_channels))


def stored_autoencoder(cfg: DictConfig, context: Context, input_shape) -> StagedModel:
    """The autoencoder this site kept from the autoencoder phase; an error when it has none yet."""
    if AUTOENCODER_STATE not in context.state:
        raise RuntimeError("this site has no autoencoder yet (the autoencoder phase did not reach it)")
    model = new_autoencoder(cfg, input_shape)
    model.load_state_dict(state_from(context.state[AUTOENCODER_STATE]))
    return model


def site_test_indices(cfg: DictConfig, num_test: int, partition_id: int, num_partitions: int) -> np.ndarray:
    """This site's share of the server's test selection (same draw as ``ServerRun.test_set``)."""
    order = test_selection(num_test, cfg.dataset.get("test_size"), cfg.seed)
    order = torch.arange(num_test) if order is None else order
    return np.array_split(order.numpy(), num_partitions)[partition_id]


def local_test_data(cfg: DictConfig, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """Service mode's images: the site's held-out rows (``dataset=site`` / ``eval.where=site``), else its share
    of the server's test selection (read at node-config ``data-root``)."""
    if eval_where(cfg) == "site":
        _, _, x, y = site_rows(cfg, context)
        return x, y
    test_x, test_y = registry_test_set(cfg, context)
    partition_id, num_partitions = partition_id_of(context)
    indices = torch.from_numpy(site_test_indices(cfg, len(test_y), partition_id, num_partitions))
    return test_x[indices], test_y[indices]


# ------------------------------------------------------------------ phases ---


def train(message: Message, context: Context) -> Message:
    """Answer ``train.features``: the ``autoencoder`` or the ``upload`` phase, as the message's ``phase`` says."""
    phase = str(message.content["config"]["phase"])
    if phase == "autoencoder":
        return train_site_autoencoder(message, context)
    if phase == "upload":
        return upload_chunk(message, context)
    raise ValueError(f"train.features: unknown phase '{phase}' (autoencoder | upload)")


def train_site_autoencoder(message: Message, context: Context) -> Message:
    """Train the site's autoencoder for one round (from the federated weights when sent) and keep it in the context."""
    cfg = config_of(message)
    settings = cfg.protocol.autoencoder
    partition_id, _ = partition_id_of(context)
    x, _ = local_data(cfg, context)
    seed = round_seed(cfg.seed, int(message.content["config"].get("server-round", 0)), partition_id)
    federated = "arrays" in message.content
    if federated:  # every weight comes from the server: this thread's autoencoder of the same shape takes them
        shape_key = ("conv_ae", int(cfg.protocol.latent_dim), int(cfg.protocol.conv_channels), tuple(x.shape[1:]))
        model = module_holding(shape_key, lambda: new_autoencoder(cfg, x.shape[1:]), state_from(message.content["arrays"]))
    else:  # a local autoencoder's start follows ``seed`` too (built on the CPU; training seeds again)
        seed_torch(seed, torch.device("cpu"))
        model = new_autoencoder(cfg, x.shape[1:])
    result = train_autoencoder(
        model,
        x,
        epochs=int(settings.local_epochs if federated else settings.epochs),
        batch_size=int(settings.batch_size),
        lr=float(settings.lr),
        device=training_device(cfg, context),
        seed=seed,
    )
    model.cpu()
    with overlapping():  # this site's tensors only: another simulated site may run meanwhile
        trained = ArrayRecord(model.state_dict())
    context.state[AUTOENCODER_STATE] = trained
    flops = train_flops_per_sample(model, x, torch.nn.functional.mse_loss, x) * result["samples"]
    metrics = MetricRecord({"num-examples": len(x), "ae_loss": result["ae_loss"], "partition-id": partition_id, "client_flops": flops})
    content = RecordDict({"metrics": metrics})
    if federated:  # the same record as the state: the reply travels as a copy (in memory) or as bytes (deployed)
        content["arrays"] = trained
    return Message(content, reply_to=message)


def remember_acknowledged(message: Message, context: Context) -> list[str]:
    """Keep the server's acknowledgements (chunks committed to its store) in the site state."""
    acknowledged = json.loads(str(message.content["config"].get("acknowledged", "[]")))
    known = json.loads(str(context.state.get(ACK_STATE, ConfigRecord({"ids": "[]"}))["ids"]))
    merged = sorted(set(known) | set(acknowledged))
    context.state[ACK_STATE] = ConfigRecord({"ids": json.dumps(merged)})
    return merged


def install_final_autoencoder(message: Message, cfg: DictConfig, context: Context, input_shape) -> StagedModel:
    """The autoencoder the latents come from: sent along (federated/public) or the site's own."""
    if "arrays" in message.content:
        model = new_autoencoder(cfg, input_shape)
        model.load_state_dict(state_from(message.content["arrays"]))
        context.state[AUTOENCODER_STATE] = ArrayRecord(model.state_dict())
        return model
    return stored_autoencoder(cfg, context, input_shape)


def released_latents(cfg: DictConfig, latents: torch.Tensor) -> torch.Tensor:
    """Latents as they leave the site: plus Gaussian noise of std ``defence.noise_std`` when set (OS-CSPRNG draws)."""
    return SiteDefences(DefenceConfig.from_config(cfg)).activations_out(latents)


def upload_chunk(message: Message, context: Context) -> Message:
    """Encode one chunk of the site's training rows and send the latents with their labels."""
    cfg = config_of(message)
    request = message.content["config"]
    chunk, chunk_size = int(request["chunk"]), int(request["chunk_size"])
    partition_id, _ = partition_id_of(context)
    acknowledged = remember_acknowledged(message, context)
    x, y = local_data(cfg, context)
    model = install_final_autoencoder(message, cfg, context, x.shape[1:])
    if chunk == 0:
        stats = standardization_of(cfg, context)  # what this site standardized with (fixed or federated), for `graftfl predict`
        save_autoencoder(site_dir(context) / AUTOENCODER_FILE, model, x.shape[1:], int(cfg.protocol.conv_channels), stats)
    first = chunk * chunk_size
    rows = slice(first, min(first + chunk_size, len(y)))
    latents = released_latents(cfg, encode(model, x[rows], device=client_device(cfg, context)))
    num_chunks = max(1, -(-len(y) // chunk_size))
    content = RecordDict(
        {
            "arrays": ArrayRecord({"latents": latents, "labels": y[rows].clone()}),
            "upload": ConfigRecord(
                {"client_id": str(request["client_id"]), "upload_id": str(request["upload_id"]), "first_row": first, "num_chunks": num_chunks, "total_rows": len(y)}
            ),
            "metrics": MetricRecord({"partition-id": partition_id, "acknowledged": len(acknowledged)}),
        }
    )
    return Message(content, reply_to=message)


def query(message: Message, context: Context) -> Message:
    """Service mode: latents of this site's test images, without their labels."""
    cfg = config_of(message)
    remember_acknowledged(message, context)
    partition_id, _ = partition_id_of(context)
    x, _ = local_test_data(cfg, context)
    latents = released_latents(cfg, encode(stored_autoencoder(cfg, context, x.shape[1:]), x, device=client_device(cfg, context)))
    content = RecordDict(
        {
            "arrays": ArrayRecord({"latents": latents}),
            "upload": ConfigRecord({"client_id": str(message.content["config"]["client_id"]), "mode": "service"}),
            "metrics": MetricRecord({"partition-id": partition_id}),
        }
    )
    return Message(content, reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Score the server's answers on this site's test images; Eq. 9 and the figure."""
    cfg = config_of(message)
    partition_id, _ = partition_id_of(context)
    x, y = local_test_data(cfg, context)
    num_classes = num_classes_of(cfg, context)
    predicted = state_from(message.content["arrays"])["predictions"].long()
    if len(predicted) != len(y):
        raise ValueError(f"got {len(predicted)} predictions for {len(y)} test images")
    correct = predicted == y
    model = stored_autoencoder(cfg, context, x.shape[1:])
    error_sums, error_counts = reconstruction_error_by_class(model, x, y, num_classes, client_device(cfg, context))
    figure = class_grid_figure(site_dir(context) / "reconstructions.png", model, x, y, num_classes, title=f"{site_name(partition_id)}: original / latent / reconstruction")
    metrics = MetricRecord(
        {
            "partition-id": partition_id,
            "correct_by_class": [int(correct[y == c].sum()) for c in range(num_classes)],
            "count_by_class": [int((y == c).sum()) for c in range(num_classes)],
            "error_sum_by_class": error_sums,
            "error_count_by_class": error_counts,
        }
    )
    content = RecordDict({"metrics": metrics, "files": ConfigRecord({"figure": str(figure or "")})})
    return Message(content, reply_to=message)


CLIENT_PROTOCOL = ClientProtocol(name=PROTOCOL, train=train, evaluate=evaluate, query=query)
