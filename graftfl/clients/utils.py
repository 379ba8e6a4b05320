"""Helpers shared by the client side of every protocol.

Client state that must outlive one message lives in ``context.state`` (weights as
ArrayRecords, accountant history as ConfigRecord strings): module globals are
shared between virtual clients in simulation and lost in deployment. The one
global here is a read-only cache of per-model FLOP counts.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from omegaconf import DictConfig

from graftfl.config import from_container
from graftfl.core.data import dataset_from_config, make_loader, partition_indices
from graftfl.core.meter import count_train_flops
from graftfl.core.models import StagedModel, build_model
from graftfl.core.privacy import PrivateTraining, dpsgd_config_from, history_from_json, history_to_json
from graftfl.core.train import make_optimizer, resolve_device, train
from graftfl.core.wire import (
    CONFIG_KEY,
    CONFIG_RECORD,
    NODE_DATA_ROOT,
    NODE_DEVICE,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NUM_EXAMPLES,
    PRIVACY_HISTORIES,
)

PRIVACY_STATE_KEY = "privacy"
_FLOPS_PER_SAMPLE: dict[tuple, float] = {}


def config_of(message: Message) -> DictConfig:
    """The resolved run config the server sent with ``message``."""
    record = message.content[CONFIG_RECORD]
    if CONFIG_KEY not in record:
        raise ValueError(f"message '{message.metadata.message_type}' carries no {CONFIG_KEY}")
    return from_container(json.loads(record[CONFIG_KEY]))


def partition_id_of(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (set by the simulation or the SuperNode)."""
    try:
        partition_id = int(context.node_config[NODE_PARTITION_ID])
        num_partitions = int(context.node_config[NODE_NUM_PARTITIONS])
    except KeyError as err:
        raise ValueError("node config needs partition-id and num-partitions (flower-supernode --node-config)") from err
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} must be in [0, num-partitions={num_partitions})")
    return partition_id, num_partitions


def client_device(cfg: DictConfig, context: Context) -> torch.device:
    """The node config's ``device`` (a local fact) wins over the run config's."""
    return resolve_device(str(context.node_config.get(NODE_DEVICE, cfg.device)))


def local_data(cfg: DictConfig, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """This site's training partition (only its own indices are kept)."""
    data_cfg = cfg.dataset
    if NODE_DATA_ROOT in context.node_config:
        data_cfg = from_container({**dict(data_cfg), "root": str(context.node_config[NODE_DATA_ROOT])})
    data = dataset_from_config(data_cfg)
    partition_id, num_partitions = partition_id_of(context)
    indices = torch.from_numpy(partition_indices(data.train_y, cfg.partition, num_partitions, partition_id, cfg.seed))
    return data.train_x[indices], data.train_y[indices]


def new_model(cfg: DictConfig, input_shape, num_classes: int) -> StagedModel:
    return build_model(cfg.model.name, input_shape, num_classes, **cfg.model.get("kwargs", {}))


def num_classes_of(cfg: DictConfig) -> int:
    return dataset_from_config(cfg.dataset).num_classes


def round_seed(cfg: DictConfig, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed per (run seed, round, site)."""
    return int(cfg.seed) * 1_000_003 + server_round * 1_009 + partition_id


def flops_per_sample(cfg: DictConfig, model: torch.nn.Module, example: torch.Tensor, labels: torch.Tensor) -> float:
    """Forward + backward FLOPs per training sample (counted once per model and input shape)."""
    key = (cfg.model.name, tuple(example.shape[1:]))
    if key not in _FLOPS_PER_SAMPLE:
        _FLOPS_PER_SAMPLE[key] = count_train_flops(model, example[:2], torch.nn.functional.cross_entropy, labels[:2]) / len(example[:2])
    return _FLOPS_PER_SAMPLE[key]


def local_train(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: DictConfig,
    context: Context,
    seed: int,
    restored_history: str | None = None,
) -> dict[str, float]:
    """One round of local training with the shared core loop, DP-SGD when configured.

    With ``privacy=dpsgd`` the accountant history is read from and written back to
    ``context.state`` so the returned ``epsilon`` is cumulative over rounds. A
    fresh client process of a resumed run has no state yet: ``restored_history``
    (the history the server checkpointed for this site) is used then.
    """
    torch.manual_seed(seed)
    device = client_device(cfg, context)
    loader = make_loader(x, y, cfg.train.batch_size, shuffle=True, seed=seed)
    optimizer = make_optimizer(cfg.train.optimizer, model.parameters(), cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay)
    flops = flops_per_sample(cfg, model, x, y)
    dp_config = dpsgd_config_from(cfg.privacy, planned_epochs=cfg.rounds * cfg.train.local_epochs)
    metrics: dict[str, float] = {}
    if dp_config is None:
        result = train(model, loader, optimizer, device=device, epochs=cfg.train.local_epochs, max_steps=cfg.train.local_steps, show_progress=cfg.progress)
    else:
        state = context.state.get(PRIVACY_STATE_KEY, ConfigRecord())
        private = PrivateTraining(dp_config, history_from_json(state.get("history", restored_history)))
        dp_model, dp_optimizer, dp_loader = private.attach(model, optimizer, loader)
        result = train(dp_model, dp_loader, dp_optimizer, device=device, epochs=cfg.train.local_epochs, max_steps=cfg.train.local_steps)
        context.state[PRIVACY_STATE_KEY] = ConfigRecord({"history": history_to_json(private.history)})
        metrics["epsilon"] = private.epsilon()
    metrics.update(train_loss=result["loss"], steps=result["steps"], client_flops=flops * result["samples"], **{NUM_EXAMPLES: len(y)})
    return metrics


def privacy_history_of(context: Context) -> str | None:
    """This site's accountant history (JSON), to hand back to the server for checkpoints."""
    state = context.state.get(PRIVACY_STATE_KEY)
    return state.get("history") if state is not None else None


def restored_history_for(message: Message, partition_id: int) -> str | None:
    """The history the server checkpointed for ``partition_id`` (sent on resume), if any."""
    histories = json.loads(message.content[CONFIG_RECORD].get(PRIVACY_HISTORIES, "{}"))
    return histories.get(str(partition_id))


def state_from(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def as_float_list(values) -> list[float]:
    return [float(v) for v in np.asarray(values).reshape(-1)]
