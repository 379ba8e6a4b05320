"""DSSGD participant: keep a local model, overwrite the downloaded part, train, upload a sparse Δ.

Unlike FedAvg the local model survives between rounds in ``context.state``; the
download overwrites only the coordinates the server sent (all of them at θd = 1).
The tensor logic lives in :mod:`graftfl.core.selective`.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from graftfl.clients.site_data import registry_test_set, site_rows
from graftfl.clients.utils import (
    client_device,
    config_of,
    evaluate_global_model,
    local_data,
    local_train,
    model_holding,
    num_classes_of,
    partition_id_of,
    seeded_build,
    state_from,
)
from graftfl.config import eval_where
from graftfl.core.codec import assign_flat_parameters, flatten_parameters
from graftfl.core.data import dataset_from_config
from graftfl.core.models import model_from_config
from graftfl.core.overlap import overlapping
from graftfl.core.privacy import secret_generator
from graftfl.core.selective import decode_sparse, encode_sparse, make_upload, overwrite
from graftfl.core.split import test_subset
from graftfl.core.train import evaluate, round_seed, seed_torch
from graftfl.protocols import ClientProtocol

PROTOCOL = "dssgd"
LOCAL_MODEL_KEY = "dssgd-local-model"
PRIVATE_WITHHELD = ("train_loss", "local_accuracy", "local_loss")  # not sent with selection=sparse_vector


def local_model(cfg, context: Context, input_shape, num_classes: int) -> torch.nn.Module:
    """The participant's own model, on the CPU: from ``context.state``, or the run's seeded initial model.

    A stored model overwrites every weight, so it goes into this thread's module of the same
    architecture (``model_holding``) instead of a freshly initialised one; nothing after this
    draws from torch's global generator unseeded, so the run computes the same. The seeded
    initial model is the thread's last one reset where a fresh build would repeat it
    (``seeded_build``: the first round's participants all start from it).
    """
    if LOCAL_MODEL_KEY in context.state:
        return model_holding(cfg, input_shape, num_classes, state_from(context.state[LOCAL_MODEL_KEY])).cpu()
    seed_torch(int(cfg.seed), torch.device("cpu"))  # the same initial weights as the server's global model (built on the CPU)
    return seeded_build((id(cfg), PROTOCOL, tuple(input_shape), int(num_classes)), lambda: model_from_config(cfg, input_shape, num_classes),
                        lambda model: {"model": model}, anchor=cfg, reusable=cfg.privacy.name != "dpsgd").cpu()


def download_into(model: torch.nn.Module, download: ArrayRecord) -> int:
    """Overwrite the downloaded coordinates of ``model``; returns how many were written."""
    indices, values = decode_sparse({name: array.numpy() for name, array in download.items()})
    assign_flat_parameters(model, overwrite(flatten_parameters(model), indices, values.to(torch.float32)))
    return int(values.numel())


def local_test_metrics(model: torch.nn.Module, cfg, device: torch.device, context: Context | None = None) -> dict:
    """Accuracy and loss of the local model: on the site's held-out rows (``eval.where=site``), else on the
    server's test set (the same subset the server uses, read at node-config ``data-root``)."""
    if context is not None and eval_where(cfg) == "site":
        _, _, x, y = site_rows(cfg, context)
        evaluation = evaluate(model, x, y, device=device, batch_size=cfg.eval.batch_size)
        return {"local_accuracy": evaluation["accuracy"], "local_loss": evaluation["loss"]}
    if context is not None:  # standardized as this site standardizes its own rows
        x, y = registry_test_set(cfg, context, cfg.dataset.get("test_size"))
    else:
        data = dataset_from_config(cfg.dataset)
        x, y = test_subset(data.test_x, data.test_y, cfg.dataset.get("test_size"), int(cfg.seed))
    evaluation = evaluate(model, x, y, device=device, batch_size=cfg.eval.batch_size)
    return {"local_accuracy": evaluation["accuracy"], "local_loss": evaluation["loss"]}


def train(message: Message, context: Context) -> Message:
    """Answer ``train.dssgd``: load the downloaded parameters, train locally, upload a selected (optionally DP) fraction of the update."""
    cfg = config_of(message)
    protocol = cfg.protocol
    server_round = int(message.content["config"]["server-round"])
    partition_id, _ = partition_id_of(context)
    seed = round_seed(cfg.seed, server_round, partition_id)
    x, y = local_data(cfg, context)
    model = local_model(cfg, context, x.shape[1:], num_classes_of(cfg, context))
    with overlapping():  # this site's model and message only: another simulated site may run meanwhile
        downloaded = download_into(model, message.content["download"])
        before = flatten_parameters(model).clone()
    metrics = local_train(model, x, y, cfg, context, seed=seed)
    private = protocol.selection == "sparse_vector"
    # Privacy noise from a secret seed: the server knows the run seed and could replay seeded noise.
    generator = secret_generator() if private else torch.Generator().manual_seed(seed)
    with overlapping():  # this site's tensors and its own generator, nothing from torch's global one
        delta = flatten_parameters(model).cpu() - before  # training may have moved the model to the GPU
        upload = make_upload(
            delta,
            theta_upload=float(protocol.theta_upload),
            selection=protocol.selection,
            threshold=protocol.threshold,
            clip=protocol.clip,
            upload_epsilon=protocol.upload_epsilon,
            generator=generator,
        )
        context.state[LOCAL_MODEL_KEY] = ArrayRecord(model.state_dict())  # the full local update stays here
    if private:
        # Only what ε covers leaves the site: the training loss and the local model's test accuracy are
        # functions of the site's data outside the mechanism. (The data set's size is treated as public.)
        for key in PRIVATE_WITHHELD:
            metrics.pop(key, None)
    metrics.update(
        {
            "partition-id": partition_id,
            **({} if private else local_test_metrics(model, cfg, client_device(cfg, context), context)),
            "downloaded": downloaded,
            "uploaded": int(upload.indices.numel()),
            "noise_scale": upload.noise_scale,
        }
    )
    arrays = encode_sparse(upload.indices, upload.values, delta.numel())
    content = RecordDict(
        {"upload": ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()}), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=message)


def evaluate_global(message: Message, context: Context) -> Message:
    """``eval.where=site``: the server's global model on this site's held-out rows; only counts go back."""
    cfg = config_of(message)
    model = model_from_config(cfg, local_data(cfg, context)[0].shape[1:], num_classes_of(cfg, context))
    metrics = evaluate_global_model(message, context, model)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


CLIENT_PROTOCOL = ClientProtocol(name=PROTOCOL, train=train, evaluate=evaluate_global)
