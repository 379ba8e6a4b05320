"""Distributed selective SGD (Shokri & Shmatikov; Ko): the server side.

The server keeps the global parameter vector and per-parameter statistics. Each
round it sends every chosen participant a fraction θd of the global parameters,
receives a sparse upload (at most θu·|W| clipped values), validates it, and adds
it to the global vector. Participants keep their own models between rounds
(see ``graftfl/clients/dssgd.py``); their test accuracy is the paper's figure.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from graftfl.core.codec import assign_flat_parameters, flatten_parameters
from graftfl.core.selective import (
    DOWNLOADS,
    SELECTIONS,
    ParameterStatistics,
    apply_upload,
    choose_download,
    coordinate_budget,
    decode_sparse,
    encode_sparse,
    validate_upload,
)
from graftfl.core.wire import SERVER_ROUND
from graftfl.protocols import ServerProtocol
from graftfl.strategies.utils import ServerRun, arrays_nbytes, require_choice, wait_for_nodes

PROTOCOL = "dssgd"
logger = logging.getLogger(__name__)
ORDERS = ("random", "round_robin")


def validate_config(cfg) -> None:
    """Reject impossible protocol settings before any training starts."""
    protocol = cfg.protocol
    require_choice("protocol.selection", protocol.selection, SELECTIONS)
    require_choice("protocol.download", protocol.download, DOWNLOADS)
    require_choice("protocol.order", protocol.order, ORDERS)
    if protocol.selection == "threshold" and (protocol.threshold is None or protocol.threshold < 0):
        raise ValueError("selection=threshold needs protocol.threshold (tau) >= 0")
    if protocol.clip is not None and protocol.clip <= 0:
        raise ValueError(f"protocol.clip (gamma) must be > 0 or null, got {protocol.clip}")
    if protocol.upload_epsilon is not None:
        if protocol.upload_epsilon <= 0:
            raise ValueError(f"protocol.upload_epsilon must be > 0 or null, got {protocol.upload_epsilon}")
        if protocol.clip is None:
            raise ValueError("protocol.upload_epsilon (Laplace noise) needs protocol.clip (gamma) to bound the sensitivity")
    if cfg.resume and (cfg.privacy.name != "none" or protocol.upload_epsilon is not None):
        # The participants' accountant and Laplace histories live in their context.state, which a
        # resumed run does not have: its cumulative epsilon would restart at 0 and under-report.
        raise ValueError("protocol=dssgd cannot resume a run with privacy (privacy=dpsgd or protocol.upload_epsilon): "
                         "the participants' privacy histories are not in the checkpoint, so the cumulative epsilon would be wrong")


class SelectiveServer:
    """Global parameters, their statistics and the upload budget of one DSSGD run.

    Parameters
    ----------
    run : ServerRun
        The run (config, recorder, test set).
    """

    def __init__(self, run: ServerRun):
        self.run = run
        self.cfg = run.cfg
        self.model = run.new_model()
        self.params = flatten_parameters(self.model).clone()
        self.stats = ParameterStatistics(self.params.numel())
        self.cursor = 0  # next participant in round-robin order
        extra = (run.resume_state or {}).get("extra", {})
        if "stats" in extra:
            self.stats.load_state_dict(extra["stats"])
            self.cursor = int(extra.get("cursor", 0))
        self.max_upload = coordinate_budget(float(self.cfg.protocol.theta_upload), self.params.numel())

    @property
    def num_params(self) -> int:
        return self.params.numel()

    def participants(self, nodes: list[int], server_round: int) -> list[int]:
        """This round's participants: a random ``fraction_train`` sample, or the next ones in round-robin order."""
        count = max(1, int(math.ceil(float(self.cfg.protocol.fraction_train) * len(nodes))))
        if self.cfg.protocol.order == "round_robin":
            chosen = [nodes[(self.cursor + i) % len(nodes)] for i in range(count)]
            self.cursor = (self.cursor + count) % len(nodes)
            return chosen
        rng = np.random.default_rng([int(self.cfg.seed), server_round])
        picked = rng.choice(len(nodes), size=count, replace=False)  # positions: node ids overflow int64
        return [nodes[int(i)] for i in sorted(picked)]

    def download_message(self, node: int, server_round: int) -> Message:
        generator = torch.Generator().manual_seed(int(self.cfg.seed) * 7919 + server_round * 131 + node % 100_003)
        indices = choose_download(self.cfg.protocol.download, float(self.cfg.protocol.theta_download), self.params, self.stats, generator)
        values = self.params if indices is None else self.params[indices]
        arrays = encode_sparse(indices, values, self.num_params)
        content = RecordDict(
            {
                "config": self.run.config_record(**{SERVER_ROUND: server_round}),
                "download": ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()}),
            }
        )
        return Message(content=content, dst_node_id=node, message_type=f"train.{PROTOCOL}")

    def accept(self, reply: Message, server_round: int) -> str | None:
        """Validate and apply one reply's upload; the rejection reason, or None when applied."""
        if "upload" not in reply.content:
            return "reply carries no upload"
        try:
            indices, values = decode_sparse({name: array.numpy() for name, array in reply.content["upload"].items()})
        except (ValueError, TypeError) as err:
            return f"undecodable upload: {err}"
        reason = validate_upload(indices, values, self.num_params, self.max_upload)
        if reason is None:
            apply_upload(self.params, indices, values)
            self.stats.record(indices, server_round)
        return reason

    def global_model(self) -> torch.nn.Module:
        assign_flat_parameters(self.model, self.params)
        return self.model


def exchange(grid: Grid, server: SelectiveServer, nodes: list[int], server_round: int, timeout_s: float) -> dict:
    """Send downloads to ``nodes`` (one batch), apply the valid uploads; what happened, per node."""
    messages = [server.download_message(node, server_round) for node in nodes]
    outcome = {"bytes_down": sum(arrays_nbytes(m.content["download"]) for m in messages), "clients": [], "rejected": [], "failed": []}
    replies = {reply.metadata.src_node_id: reply for reply in grid.send_and_receive(messages, timeout=timeout_s)}
    for node in nodes:
        reply = replies.get(node)
        if reply is None or reply.has_error():
            why = "no reply within timeout" if reply is None else f"error: {reply.error.reason}"
            logger.warning(f"[dssgd] round {server_round}: node {node} skipped ({why})")
            outcome["failed"].append({"node": int(node), "reason": why})
            continue
        metrics = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
        bytes_up = arrays_nbytes(reply.content["upload"]) if "upload" in reply.content else 0
        reason = server.accept(reply, server_round)
        if reason is not None:
            logger.warning(f"[dssgd] round {server_round}: upload of node {node} rejected: {reason}")
            outcome["rejected"].append({"node": int(node), "partition": int(metrics.get("partition-id", -1)), "reason": reason})
        outcome["clients"].append({**metrics, "node": int(node), "bytes_up": bytes_up, "accepted": reason is None})
    return outcome


def merge(outcomes: list[dict]) -> dict:
    merged = {"bytes_down": 0, "clients": [], "rejected": [], "failed": []}
    for outcome in outcomes:
        merged["bytes_down"] += outcome["bytes_down"]
        for key in ("clients", "rejected", "failed"):
            merged[key] += outcome[key]
    return merged


def summarise(values: list[float], prefix: str) -> dict:
    if not values:
        return {}
    return {f"{prefix}_mean": float(np.mean(values)), f"{prefix}_min": float(np.min(values)), f"{prefix}_max": float(np.max(values))}


class ParticipantLedger:
    """The latest accuracy, loss and cumulative ε reported by each participant (keyed by partition id)."""

    FIELDS = ("local_accuracy", "local_loss", "epsilon", "laplace_epsilon")

    def __init__(self):
        self.latest: dict[str, dict[int, float]] = {field: {} for field in self.FIELDS}

    def update(self, clients: list[dict]) -> None:
        for client in clients:
            for field in self.FIELDS:
                if field in client:
                    self.latest[field][int(client["partition-id"])] = float(client[field])

    def values(self, field: str) -> list[float]:
        return [value for _, value in sorted(self.latest[field].items())]


def round_row(server_round: int, outcome: dict, ledger: ParticipantLedger, evaluation: dict, wall_s: float) -> dict:
    """One metrics.jsonl row: the participants' local models (the paper's figure) and the global model."""
    clients = sorted(outcome["clients"], key=lambda c: c.get("partition-id", -1))
    local_accuracy = ledger.values("local_accuracy")
    row = {
        "round": server_round,
        "accuracy": float(np.mean(local_accuracy)) if local_accuracy else None,
        "loss": float(np.mean(ledger.values("local_loss"))) if ledger.values("local_loss") else None,
        **summarise(local_accuracy, "local_accuracy"),
        "global_accuracy": evaluation["accuracy"],
        "global_loss": evaluation["loss"],
        "bytes_up": sum(c["bytes_up"] for c in clients),
        "bytes_down": outcome["bytes_down"],
        "client_flops": sum(c.get("client_flops", 0) for c in clients),
        "wall_s": wall_s,
        "clients": [int(c.get("partition-id", -1)) for c in clients],
        "client_local_accuracy": [c.get("local_accuracy") for c in clients],
        "client_train_loss": [c.get("train_loss") for c in clients],
        "client_bytes_up": [c["bytes_up"] for c in clients],
        "client_uploaded": [c.get("uploaded") for c in clients],
        "local_accuracy_all": local_accuracy,
        "rejected": outcome["rejected"],
        "failed": outcome["failed"],
    }
    for field in ("epsilon", "laplace_epsilon"):
        values = ledger.values(field)
        if values:
            row[field] = max(values)
            row[f"client_{field}"] = values
    return row


def run(grid: Grid, run: ServerRun) -> dict:
    """Run DSSGD for the remaining rounds; returns extra summary fields."""
    cfg = run.cfg
    server = SelectiveServer(run)
    ledger = ParticipantLedger()
    nodes = wait_for_nodes(grid, cfg.num_clients, cfg.timeout_s)
    run.round_seconds()
    rejected_total = failed_total = 0
    for server_round in range(run.first_round, cfg.rounds + 1):
        chosen = server.participants(nodes, server_round)
        if cfg.protocol.order == "round_robin":  # sequential: each sees the uploads of those before it
            outcome = merge([exchange(grid, server, [node], server_round, cfg.timeout_s) for node in chosen])
        else:
            outcome = exchange(grid, server, chosen, server_round, cfg.timeout_s)
        ledger.update(outcome["clients"])
        evaluation = run.evaluate(server.global_model())
        row = run.recorder.log_round(round_row(server_round, outcome, ledger, evaluation, run.round_seconds()))
        rejected_total += len(outcome["rejected"])
        failed_total += len(outcome["failed"])
        run.checkpoint(server_round, server.global_model(), {"stats": server.stats.state_dict(), "cursor": server.cursor})
        logger.info(
            f"[dssgd] round {server_round}/{cfg.rounds} local accuracy {row['accuracy'] or float('nan'):.4f} "
            f"global {evaluation['accuracy']:.4f} up {row['bytes_up']} B"
        )
    final = run.recorder.rows[-1] if run.recorder.rows else {}
    return {
        "num_params": server.num_params,
        "upload_budget": server.max_upload,
        "global_accuracy": final.get("global_accuracy"),
        "local_accuracy_min": final.get("local_accuracy_min"),
        "local_accuracy_max": final.get("local_accuracy_max"),
        "rejected_uploads": rejected_total,
        "failed_participants": failed_total,
    }


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
