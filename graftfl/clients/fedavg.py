"""FedAvg client: load the global model, train locally, return the whole model."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from graftfl.clients.utils import (
    evaluate_global_model,
    config_of,
    local_data,
    local_train,
    model_holding,
    num_classes_of,
    partition_id_of,
    privacy_history_of,
    restored_history_for,
    state_from,
)
from graftfl.core.models import model_from_config
from graftfl.core.overlap import overlapping
from graftfl.core.train import round_seed
from graftfl.core.wire import PARTITION_ID, ROUND_OFFSET, SERVER_ROUND
from graftfl.protocols import ClientProtocol

PROTOCOL = "fedavg"


def train(message: Message, context: Context) -> Message:
    """Answer ``train.fedavg``: train the received model on the local data and reply with the weights and metrics."""
    cfg = config_of(message)
    fields = message.content["config"]
    # Flower counts a resumed run's rounds from 1 again; the offset keeps the seeds of an uninterrupted run.
    server_round = int(fields[SERVER_ROUND]) + int(fields.get(ROUND_OFFSET, 0))
    x, y = local_data(cfg, context)
    model = model_holding(cfg, x.shape[1:], num_classes_of(cfg, context), state_from(message.content["arrays"]))
    partition_id, _ = partition_id_of(context)
    seed = round_seed(cfg.seed, server_round, partition_id)
    metrics = local_train(model, x, y, cfg, context, seed, restored_history_for(message, partition_id))
    metrics[PARTITION_ID] = partition_id
    with overlapping():  # this client's tensors only: another simulated client may run meanwhile
        arrays = ArrayRecord(model.state_dict())
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    history = privacy_history_of(context)
    if history is not None:  # (noise, sample rate, steps) only: lets the server checkpoint the accountant
        content["privacy"] = ConfigRecord({"history": history})
    return Message(content=content, reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Score the global model on this site's held-out rows (``eval.where=site``); only counts go back."""
    cfg = config_of(message)
    x, _ = local_data(cfg, context)
    metrics = evaluate_global_model(message, context, model_from_config(cfg, x.shape[1:], num_classes_of(cfg, context)))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


CLIENT_PROTOCOL = ClientProtocol(name=PROTOCOL, train=train, evaluate=evaluate)
