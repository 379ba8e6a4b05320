"""Client-side turn handling shared by ``split``, ``ushaped`` and ``semisup``.

A ``train.<protocol>`` message is one turn: restore the client's model parts
(relayed ciphertext, ``context.state`` or averaged arrays; the first turn starts
from the shared seed, Gupta & Raskar §3.4), stream the turn's batches over the
data plane, and reply with metrics plus what the hand-off policy needs. An
``evaluate.<protocol>`` message streams the server's test set the same way.

Each protocol's client module only supplies a *role builder*
``build_role(cfg, model, input_shape, num_classes, device) -> role`` (a role from
:mod:`graftfl.core.split`).
"""

from __future__ import annotations

import io
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from graftfl.clients.utils import client_device, config_of, local_data, new_model, num_classes_of, partition_id_of
from graftfl.core.data import dataset_from_config
from graftfl.core.handoff import AVERAGE_KEY, RELAY_KEY, client_key, decrypt_state, encrypt_state
from graftfl.core.meter import count_train_flops
from graftfl.core.split import SemisupClient, hidden_label_mask, test_subset
from graftfl.core.train import make_optimizer, seed_everything
from graftfl.core.wire import DATA_PLANE_ADDRESS, DATA_PLANE_TOKEN, NODE_CA_CERT, max_frame_bytes
from graftfl.transport.client import DataPlaneClient

STATE_KEY = "split-client"
PROGRESS_KEY = "split-progress"
RoleBuilder = Callable[..., object]


def role_optimizer(cfg, role) -> torch.optim.Optimizer:
    params = [p for module in role.modules().values() for p in module.parameters()]
    return make_optimizer(cfg.train.optimizer, params, cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay)


def role_state(role) -> dict:
    return {"modules": {name: module.state_dict() for name, module in role.modules().items()}, "optimizer": role.optimizer.state_dict()}


def load_role_state(role, state: dict) -> None:
    for name, module in role.modules().items():
        module.load_state_dict(state["modules"][name])
    role.optimizer.load_state_dict(state["optimizer"])


def role_arrays(role) -> ArrayRecord:
    """The role's weights as one flat ArrayRecord (``bottom.conv1.0.weight``, ...) for averaging."""
    return ArrayRecord({f"{name}.{key}": value for name, module in role.modules().items() for key, value in module.state_dict().items()})


def load_role_arrays(role, arrays: ArrayRecord) -> None:
    state = arrays.to_torch_state_dict()
    for name, module in role.modules().items():
        prefix = f"{name}."
        module.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})


def ca_cert_of(cfg, context: Context) -> str | None:
    """The CA the client trusts for the data plane: node-config ``ca-cert`` wins (a local fact)."""
    return str(context.node_config.get(NODE_CA_CERT) or "") or (cfg.get("tls") or {}).get("ca_cert")


def relay_key(context: Context) -> bytes:
    """This client's relay key: its node config or environment only, never the server's message."""
    return client_key(dict(context.node_config))


def prepare_role(cfg, message: Message, context: Context, build_role: RoleBuilder, input_shape, num_classes: int, key: bytes | None = None):
    """The client's role, restored according to ``protocol.handoff`` (``key``: the relay key, when known)."""
    device = client_device(cfg, context)
    seed_everything(cfg.seed, cfg.deterministic)  # the shared seed: same initial model as the server's
    model = new_model(cfg, input_shape, num_classes)
    role = build_role(cfg, model, input_shape, num_classes, device)
    role.optimizer = role_optimizer(cfg, role)
    handoff = cfg.protocol.handoff
    content = message.content
    if handoff == "relay" and "handoff" in content and RELAY_KEY in content["handoff"]:
        key = key if key is not None else relay_key(context)
        load_role_state(role, decrypt_state(key, bytes(content["handoff"][RELAY_KEY])))
    elif handoff in ("local", "average") and STATE_KEY in context.state:
        load_role_state(role, torch.load(io.BytesIO(bytes(context.state[STATE_KEY]["state"])), map_location="cpu", weights_only=True))
    if handoff == "average" and AVERAGE_KEY in content:
        load_role_arrays(role, content[AVERAGE_KEY])
    return role


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of one epoch: a seeded permutation cut into consecutive batches."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return list(order.split(batch_size))


def turn_batches(cfg, context: Context, num_samples: int, partition_id: int) -> tuple[list[torch.Tensor], dict]:
    """This turn's batches (continuing where the last turn stopped) and the progress after it."""
    progress = dict(context.state[PROGRESS_KEY]) if PROGRESS_KEY in context.state else {"epoch": 0, "batch": 0}
    epoch, position = int(progress["epoch"]), int(progress["batch"])
    seed = int(cfg.seed) * 1_009 + partition_id
    wanted = cfg.protocol.turn_batches
    if wanted is None:  # a turn is local_epochs whole epochs
        batches = [b for e in range(epoch, epoch + int(cfg.train.local_epochs)) for b in epoch_batches(num_samples, cfg.train.batch_size, seed, e)]
        return batches, {"epoch": epoch + int(cfg.train.local_epochs), "batch": 0}
    batches: list[torch.Tensor] = []
    while len(batches) < int(wanted):
        epoch_list = epoch_batches(num_samples, cfg.train.batch_size, seed, epoch)
        take = epoch_list[position : position + int(wanted) - len(batches)]
        batches.extend(take)
        position += len(take)
        if position >= len(epoch_list):
            epoch, position = epoch + 1, 0
    return batches, {"epoch": epoch, "batch": position}


def flops_per_sample(role, x: torch.Tensor, y: torch.Tensor) -> float:
    """Client FLOPs (forward + backward) per training sample of this role."""
    example = x[:2]
    flops = count_train_flops(role.bottom, example)
    if hasattr(role, "head"):
        flops += count_train_flops(role.head, torch.zeros(len(example), *role.middle_shape), torch.nn.functional.cross_entropy, y[:2])
    if hasattr(role, "decoder"):
        flops += count_train_flops(role.decoder, torch.zeros(len(example), *role.act_shape))
    return flops / len(example)


def train_turn(message: Message, context: Context, build_role: RoleBuilder) -> Message:
    """Handle ``train.<protocol>``: one turn over the data plane."""
    cfg = config_of(message)
    partition_id, _ = partition_id_of(context)
    # relay: no key of its own -> refuse the turn before any data-plane traffic (MissingSplitKey)
    key = relay_key(context) if cfg.protocol.handoff == "relay" else None
    x, y = local_data(cfg, context)
    role = prepare_role(cfg, message, context, build_role, tuple(x.shape[1:]), num_classes_of(cfg), key)
    batches, progress = turn_batches(cfg, context, len(y), partition_id)
    hidden = hidden_label_mask(len(y), cfg.protocol.unlabeled_fraction, cfg.seed * 31 + partition_id) if isinstance(role, SemisupClient) else None
    fields = message.content["config"]
    losses, samples = [], 0
    with DataPlaneClient(str(fields[DATA_PLANE_ADDRESS]), str(fields[DATA_PLANE_TOKEN]), wire_dtype=cfg.protocol.wire_dtype,
                         ca_cert=ca_cert_of(cfg, context), max_frame_bytes=max_frame_bytes(cfg)) as plane:
        for indices in batches:
            if hidden is None:
                loss = role.train_step(x[indices], y[indices], plane.exchange)
            else:
                loss = role.train_step(x[indices], y[indices], plane.exchange, labeled=~hidden[indices])
            if loss == loss:  # a semi-supervised batch without labels has no server loss
                losses.append(loss * len(indices))
            samples += len(indices)
    context.state[PROGRESS_KEY] = ConfigRecord(progress)
    metrics = {
        "partition-id": partition_id,
        "steps": len(batches),
        "samples": samples,
        "train_loss": (sum(losses) / max(samples, 1)) if losses else 0.0,
        "client_flops": flops_per_sample(role, x, y) * samples,
        "plane_bytes_up": plane.bytes_up,
        "plane_bytes_down": plane.bytes_down,
    }
    records = {"metrics": MetricRecord(metrics)}
    handoff = cfg.protocol.handoff
    if handoff == "relay":
        records["handoff"] = ConfigRecord({RELAY_KEY: encrypt_state(key, role_state(role))})
    else:
        buffer = io.BytesIO()
        torch.save(role_state(role), buffer)
        context.state[STATE_KEY] = ConfigRecord({"state": buffer.getvalue()})
        if handoff == "average":
            records[AVERAGE_KEY] = role_arrays(role)
    return Message(content=RecordDict(records), reply_to=message)


def evaluate_turn(message: Message, context: Context, build_role: RoleBuilder) -> Message:
    """Handle ``evaluate.<protocol>``: stream the server's test set through this client's parts."""
    cfg = config_of(message)
    partition_id, _ = partition_id_of(context)
    data = dataset_from_config(cfg.dataset)
    role = prepare_role(cfg, message, context, build_role, data.input_shape, data.num_classes)
    x, y = test_subset(data.test_x, data.test_y, cfg.dataset.get("test_size"), cfg.seed)
    fields = message.content["config"]
    per_sample_bytes = 4 * int(torch.tensor(role.act_shape).prod()) + 8
    batch = max(1, min(int(cfg.eval.batch_size), max_frame_bytes(cfg) // (2 * per_sample_bytes)))
    totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
    with DataPlaneClient(str(fields[DATA_PLANE_ADDRESS]), str(fields[DATA_PLANE_TOKEN]), wire_dtype=cfg.protocol.wire_dtype,
                         ca_cert=ca_cert_of(cfg, context), max_frame_bytes=max_frame_bytes(cfg)) as plane:
        for start in range(0, len(y), batch):
            result = role.eval_batch(x[start : start + batch], y[start : start + batch], plane.exchange)
            for key in totals:
                totals[key] += result[key]
    metrics = {"partition-id": partition_id, **totals}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
