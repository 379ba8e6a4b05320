"""Client-side turn handling shared by ``split``, ``ushaped`` and ``semisup``.

A ``train.<protocol>`` message is one turn: restore the client's model parts
(relayed ciphertext, ``context.state`` or averaged arrays; the first turn starts
from the shared seed, Gupta & Raskar §3.4), stream the turn's batches over the
data plane, and reply with metrics plus what the hand-off policy needs. An
``evaluate.<protocol>`` message scores the client's parts on the site's own
held-out data (``eval.where=site``, the default: a seeded ``eval.site_fraction``
of the partition that never trains) and returns aggregate counts only. The
server's own test set (``eval.where=server``) would give the server pairs of
inputs it chose and their activations, from which it can fit the bottom: with
``handoff=relay`` a site takes part only when its own node config allows it.

With ``handoff=relay`` the client-held parts start from weights derived from the
sites' relay key (:func:`relay_init_seed`), not from the server's ``seed``.

Each protocol's client module only supplies a *role builder*
``build_role(cfg, model, input_shape, num_classes, device) -> role`` (a role from
:mod:`graftfl.core.split`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from functools import partial
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from graftfl.clients.site_data import hold_out, registry_raw, registry_test_set, site_rows
from graftfl.clients.split_defences import PrivateTurn, site_defences
from graftfl.clients.utils import config_of, num_classes_of, partition_id_of, seeded_build, state_from, training_device
from graftfl.config import eval_where
from graftfl.core.handoff import AVERAGE_KEY, RELAY_KEY, client_key, decrypt_state, encrypt_state
from graftfl.core.meter import train_flops_per_sample
from graftfl.core.models import model_from_config
from graftfl.core.split import SemisupClient, hidden_label_mask
from graftfl.core.state_codec import pack_state, unpack_state
from graftfl.core.train import optimizer_from_config, seed_everything, seed_torch
from graftfl.core.wire import DATA_PLANE_ADDRESS, DATA_PLANE_TOKEN, NODE_CA_CERT, SITE_TURN_KEY, max_frame_bytes
from graftfl.protocols import ClientProtocol
from graftfl.transport.client import DataPlaneClient

STATE_KEY = "split-client"
PROGRESS_KEY = "split-progress"
RoleBuilder = Callable[..., object]


def role_optimizer(cfg, role) -> torch.optim.Optimizer:
    """An optimizer (from ``cfg.train``) over every parameter of the role's modules."""
    return optimizer_from_config(cfg.train, [p for module in role.modules().values() for p in module.parameters()])


def role_state(role) -> dict:
    """The role's module weights and optimizer state, to keep between turns."""
    return {"modules": {name: module.state_dict() for name, module in role.modules().items()}, "optimizer": role.optimizer.state_dict()}


def load_role_state(role, state: dict) -> None:
    """Restore weights and optimizer state saved by :func:`role_state`."""
    for name, module in role.modules().items():
        module.load_state_dict(state["modules"][name])
    role.optimizer.load_state_dict(state["optimizer"])


def role_arrays(role) -> ArrayRecord:
    """The role's weights as one flat ArrayRecord (``bottom.conv1.0.weight``, ...) for averaging."""
    return ArrayRecord({f"{name}.{key}": value for name, module in role.modules().items() for key, value in module.state_dict().items()})


def load_role_arrays(role, arrays: ArrayRecord) -> None:
    """Load weights saved by :func:`role_arrays` into the role's modules."""
    state = state_from(arrays)
    for name, module in role.modules().items():
        prefix = f"{name}."
        module.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})


class PlaintextRefused(RuntimeError):
    """This site requires TLS on the data plane (node-config ``require-tls=true``) and has no CA to verify with."""


def requires_tls(context: Context) -> bool:
    """Node-config ``require-tls`` (a local fact the server cannot change): ``true`` / ``false``, default false."""
    value = context.node_config.get("require-tls", False)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"node-config require-tls must be true or false, got '{value}'")


def ca_cert_of(cfg, context: Context) -> str | None:
    """The CA the client trusts for the data plane: node-config ``ca-cert`` wins (a local fact).

    With node-config ``require-tls=true`` and no CA at all, the turn is refused before
    any stream opens (:class:`PlaintextRefused`): the site never sends an activation
    in plaintext. With a CA the channel is TLS only, so a plaintext server cannot be
    reached either (the handshake fails before any frame).
    """
    ca_cert = str(context.node_config.get(NODE_CA_CERT) or "") or (cfg.get("tls") or {}).get("ca_cert")
    if not ca_cert and requires_tls(context):
        raise PlaintextRefused("this site requires TLS on the data plane (node-config require-tls=true), but neither its node-config "
                               "ca-cert nor the run's tls.ca_cert names a CA: refusing to send activations in plaintext")
    return ca_cert or None


def relay_key(context: Context) -> bytes:
    """This client's relay key: its node config or environment only, never the server's message."""
    return client_key(dict(context.node_config))


ALLOW_SERVER_EVAL_NODE_CONFIG = "allow-server-eval"
ALLOW_SERVER_EVAL_ENV = "GRAFTFL_ALLOW_SERVER_EVAL"


def relay_init_seed(key: bytes, cfg) -> int:
    """Seed of the client-held parts' initial weights under relay: a function of the sites' key.

    The server chooses ``seed``; were the bottom built from it, the server would
    know the bottom's starting point (and, after short turns, roughly the bottom).
    HMAC-SHA256 of the run seed and model under the relay key gives every site the
    same start and the server none.
    """
    tag = f"graftfl-relay-init-v1|{int(cfg.seed)}|{cfg.model.name}".encode()
    return int.from_bytes(hmac.new(key, tag, hashlib.sha256).digest()[:8], "big") >> 1


def prepare_role(cfg, message: Message, context: Context, build_role: RoleBuilder, input_shape, num_classes: int, key: bytes | None = None):
    """The client's role, restored according to ``protocol.handoff`` (``key``: the relay key, when known)."""
    device = training_device(cfg, context)
    handoff = cfg.protocol.handoff
    seed_everything(cfg.seed, cfg.deterministic, device)  # the shared seed: same initial model as the server's
    if handoff == "relay":  # ... but the parts only the sites hold start from the sites' secret
        key = key if key is not None else relay_key(context)
        seed_torch(relay_init_seed(key, cfg), device)
    role = seeded_build(
        (id(cfg), build_role, tuple(input_shape), int(num_classes), str(device)),
        lambda: build_role(cfg, model_from_config(cfg, input_shape, num_classes), input_shape, num_classes, device),
        lambda built: built.modules(), anchor=cfg, reusable=cfg.privacy.name != "dpsgd",
    )
    role.optimizer = role_optimizer(cfg, role)
    role.defences = site_defences(cfg, num_classes)  # what the site applies before tensors leave it (defence block)
    content = message.content
    if handoff == "relay" and "handoff" in content and RELAY_KEY in content["handoff"]:
        load_role_state(role, decrypt_state(key, bytes(content["handoff"][RELAY_KEY])))
    elif handoff in ("local", "average") and STATE_KEY in context.state:
        load_role_state(role, unpack_state(bytes(context.state[STATE_KEY]["state"])))
    if handoff == "average" and AVERAGE_KEY in content:
        load_role_arrays(role, content[AVERAGE_KEY])
    return role


def site_split(cfg, x: torch.Tensor, y: torch.Tensor, partition_id: int):
    """``(train_x, train_y, held_x, held_y)`` of a registry partition (:func:`graftfl.clients.site_data.hold_out`).

    With ``eval.where=server`` nothing is held out (``held_x``/``held_y`` are None).
    """
    if eval_where(cfg) != "site":
        return x, y, None, None
    return hold_out(cfg, x, y, partition_id)


def site_allows_server_eval(context: Context) -> bool:
    """The site's own consent (node config or environment) to stream the server's inputs through a relayed bottom."""
    value = context.node_config.get(ALLOW_SERVER_EVAL_NODE_CONFIG, os.environ.get(ALLOW_SERVER_EVAL_ENV, ""))
    return str(value).strip().lower() in ("1", "true", "yes")


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of one epoch: a seeded permutation cut into consecutive batches."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return list(order.split(batch_size))


def turn_batches(cfg, context: Context, num_samples: int, partition_id: int) -> tuple[list[torch.Tensor], dict]:
    """This turn's batches (continuing where the last turn stopped) and the progress after it.

    The progress also counts the site's completed turns (``turns``, this one included): a
    failed turn keeps no progress and a site left out of a round takes no turn, so the
    count, not the server's round, tells which batches a turn drew (``graftfl audit``).
    """
    progress = dict(context.state[PROGRESS_KEY]) if PROGRESS_KEY in context.state else {"epoch": 0, "batch": 0}
    epoch, position, turns = int(progress["epoch"]), int(progress["batch"]), int(progress.get("turns", 0)) + 1
    seed = int(cfg.seed) * 1_009 + partition_id
    wanted = cfg.protocol.turn_batches
    if wanted is None:  # a turn is local_epochs whole epochs
        batches = [b for e in range(epoch, epoch + int(cfg.train.local_epochs)) for b in epoch_batches(num_samples, cfg.train.batch_size, seed, e)]
        return batches, {"epoch": epoch + int(cfg.train.local_epochs), "batch": 0, "turns": turns}
    batches: list[torch.Tensor] = []
    while len(batches) < int(wanted):
        epoch_list = epoch_batches(num_samples, cfg.train.batch_size, seed, epoch)
        take = epoch_list[position : position + int(wanted) - len(batches)]
        batches.extend(take)
        position += len(take)
        if position >= len(epoch_list):
            epoch, position = epoch + 1, 0
    return batches, {"epoch": epoch, "batch": position, "turns": turns}


def flops_per_sample(role, x: torch.Tensor, y: torch.Tensor) -> float:
    """Client FLOPs (forward + backward) per training sample of this role: its bottom, head and decoder."""
    flops = train_flops_per_sample(role.bottom, x)
    if hasattr(role, "head"):
        head_input = torch.zeros(len(y[:2]), *role.middle_shape)
        flops += train_flops_per_sample(role.head, head_input, torch.nn.functional.cross_entropy, y)
    if hasattr(role, "decoder"):
        flops += train_flops_per_sample(role.decoder, torch.zeros(len(x[:2]), *role.act_shape))
    return flops


def train_turn(message: Message, context: Context, build_role: RoleBuilder) -> Message:
    """Handle ``train.<protocol>``: one turn over the data plane."""
    cfg = config_of(message)
    partition_id, _ = partition_id_of(context)
    # relay: no key of its own -> refuse the turn before any data-plane traffic (MissingSplitKey)
    key = relay_key(context) if cfg.protocol.handoff == "relay" else None
    x, y, _, _ = site_rows(cfg, context)
    role = prepare_role(cfg, message, context, build_role, tuple(x.shape[1:]), num_classes_of(cfg, context), key)
    batches, progress = turn_batches(cfg, context, len(y), partition_id)
    # privacy=dpsgd: Poisson batches (with an audit sampling seed: this turn's own), DP-SGD on the site's parts
    private = PrivateTurn(cfg, context, role, len(y), len(batches), partition_id, progress["turns"])
    batches = private.batches(batches)
    hidden = hidden_label_mask(len(y), cfg.protocol.unlabeled_fraction, cfg.seed * 31 + partition_id) if isinstance(role, SemisupClient) else None
    fields = message.content["config"]
    losses, samples = [], 0
    with DataPlaneClient(str(fields[DATA_PLANE_ADDRESS]), str(fields[DATA_PLANE_TOKEN]), wire_dtype=cfg.protocol.wire_dtype,
                         ca_cert=ca_cert_of(cfg, context), max_frame_bytes=max_frame_bytes(cfg)) as plane:
        for indices in batches:
            if private.skip(indices):  # an empty Poisson batch: a noisy step, no exchange
                continue
            if hidden is None:
                loss = role.train_step(x[indices], y[indices], plane.exchange)
            else:
                loss = role.train_step(x[indices], y[indices], plane.exchange, labeled=~hidden[indices])
            if loss == loss:  # a semi-supervised batch without labels has no server loss
                losses.append(loss * len(indices))
            samples += len(indices)
    privacy_metrics = private.finish()
    context.state[PROGRESS_KEY] = ConfigRecord(progress)
    metrics = {
        "partition-id": partition_id,
        "steps": len(batches),
        "samples": samples,
        "train_loss": (sum(losses) / max(samples, 1)) if losses else 0.0,
        "client_flops": flops_per_sample(role, x, y) * samples,
        "plane_bytes_up": plane.bytes_up,
        "plane_bytes_down": plane.bytes_down,
        SITE_TURN_KEY: progress["turns"],
        **privacy_metrics,
    }
    records = {"metrics": MetricRecord(metrics)}
    handoff = cfg.protocol.handoff
    if handoff == "relay":
        records["handoff"] = ConfigRecord({RELAY_KEY: encrypt_state(key, role_state(role))})
    else:
        context.state[STATE_KEY] = ConfigRecord({"state": pack_state(role_state(role))})
        if handoff == "average":
            records[AVERAGE_KEY] = role_arrays(role)
    return Message(content=RecordDict(records), reply_to=message)


def evaluate_turn(message: Message, context: Context, build_role: RoleBuilder) -> Message:
    """Handle ``evaluate.<protocol>``: score this client's parts; only aggregate counts go back.

    ``eval.where=site``: the site's held-out rows (:func:`site_split`).
    ``eval.where=server``: the server's test set, which hands the server inputs it
    chose together with their activations; under relay a site does that only with
    its own consent (node config ``allow-server-eval``).
    """
    cfg = config_of(message)
    partition_id, _ = partition_id_of(context)
    handoff = cfg.protocol.handoff
    key = relay_key(context) if handoff == "relay" else None
    where = eval_where(cfg)
    if where == "site":
        _, _, x, y = site_rows(cfg, context)
        input_shape, num_classes = tuple(x.shape[1:]), num_classes_of(cfg, context)
    elif where == "server":
        if handoff == "relay" and not site_allows_server_eval(context):
            raise PermissionError(
                "eval.where=server streams inputs the server chose through the relayed bottom, which reveals the bottom to the "
                f"server; this site refuses (allow it with node config {ALLOW_SERVER_EVAL_NODE_CONFIG}=true or {ALLOW_SERVER_EVAL_ENV}=1)"
            )
        raw = registry_raw(cfg, context)
        x, y = registry_test_set(cfg, context, cfg.dataset.get("test_size"))
        input_shape, num_classes = raw.input_shape, raw.num_classes
    else:
        raise ValueError(f"eval.where must be one of ['site', 'server'], got '{where}'")
    role = prepare_role(cfg, message, context, build_role, input_shape, num_classes, key)
    fields = message.content["config"]
    per_sample_bytes = 4 * max(int(torch.tensor(role.act_shape).prod()), num_classes) + 8
    batch = max(1, min(int(cfg.eval.batch_size), max_frame_bytes(cfg) // (2 * per_sample_bytes)))
    totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
    with DataPlaneClient(str(fields[DATA_PLANE_ADDRESS]), str(fields[DATA_PLANE_TOKEN]), wire_dtype=cfg.protocol.wire_dtype,
                         ca_cert=ca_cert_of(cfg, context), max_frame_bytes=max_frame_bytes(cfg)) as plane:
        for start in range(0, len(y), batch):
            result = role.eval_batch(x[start : start + batch], y[start : start + batch], plane.exchange)
            for name in totals:
                totals[name] += result[name]
    metrics = {"partition-id": partition_id, **totals}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


def split_client_protocol(name: str, build_role: RoleBuilder) -> ClientProtocol:
    """The site side of a split-family protocol: its turns over the data plane, with ``build_role``'s part.

    Parameters
    ----------
    name : str
        The protocol name (``split``, ``ushaped``, ``semisup``).
    build_role : callable
        ``build_role(cfg, model, input_shape, num_classes, device)``: the site's part of the model.
    """
    return ClientProtocol(name=name, train=partial(train_turn, build_role=build_role), evaluate=partial(evaluate_turn, build_role=build_role))
