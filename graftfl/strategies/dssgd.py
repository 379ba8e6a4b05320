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
from graftfl.core.meter import metrics_row
from graftfl.core.privacy import compose_laplace_epsilon
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
from graftfl.config import eval_where
from graftfl.strategies.replies import claimed_partition, untrusted_values
from graftfl.strategies.utils import ServerRun, evaluate_at_sites, require_choice, wait_for_nodes
from graftfl.strategies.wire_bytes import message_nbytes, messages_nbytes

PROTOCOL = "dssgd"
logger = logging.getLogger(__name__)
ORDERS = ("random", "round_robin")


def validate_config(cfg) -> None:
    """Reject impossible protocol settings before any training starts."""
    protocol = cfg.protocol
    require_choice("protocol.selection", protocol.selection, SELECTIONS)
    require_choice("protocol.download", protocol.download, DOWNLOADS)
    require_choice("protocol.order", protocol.order, ORDERS)
    if protocol.selection in ("threshold", "sparse_vector") and (protocol.threshold is None or protocol.threshold < 0):
        raise ValueError(f"selection={protocol.selection} needs protocol.threshold (tau) >= 0")
    if protocol.clip is not None and protocol.clip <= 0:
        raise ValueError(f"protocol.clip (gamma) must be > 0 or null, got {protocol.clip}")
    if protocol.upload_epsilon is not None and protocol.upload_epsilon <= 0:
        raise ValueError(f"protocol.upload_epsilon must be > 0 or null, got {protocol.upload_epsilon}")
    if protocol.selection == "sparse_vector" and (protocol.clip is None or protocol.upload_epsilon is None):
        raise ValueError("selection=sparse_vector (differentially private uploads) needs protocol.clip (gamma, bounds the "
                         "sensitivity) and protocol.upload_epsilon (epsilon per upload)")
    if protocol.selection != "sparse_vector" and protocol.upload_epsilon is not None:
        raise ValueError(f"protocol.upload_epsilon needs protocol.selection=sparse_vector: with selection={protocol.selection} "
                         "the coordinates are chosen in the clear and no epsilon bounds what an upload reveals")
    if cfg.resume and (cfg.privacy.name != "none" or protocol.upload_epsilon is not None):
        # The participants' accountant histories live in their context.state and the server's upload
        # ledger is not checkpointed: a resumed run's cumulative epsilon would restart at 0 and under-report.
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
        """Length of the flat global parameter vector."""
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
        """The ``train.dssgd`` message for ``node``: the global parameters it downloads this round (all, or a chosen fraction)."""
        generator = torch.Generator().manual_seed(int(self.cfg.seed) * 7919 + server_round * 131 + self.run.site_key(node))
        indices = choose_download(self.cfg.protocol.download, float(self.cfg.protocol.theta_download), self.params, self.stats, generator)
        values = self.params if indices is None else self.params[indices]
        self.run.audit.dssgd_download(node, self.params)
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
        if not isinstance(reply.content.get("upload"), ArrayRecord):
            return "reply carries no upload (an ArrayRecord named 'upload')"
        try:
            indices, values = decode_sparse({name: untrusted_values(array) for name, array in reply.content["upload"].items()})
        except (ValueError, TypeError) as err:
            return f"undecodable upload: {err}"
        reason = validate_upload(indices, values, self.num_params, self.max_upload, bound=self.cfg.protocol.clip)
        if reason is None:
            self.run.audit.dssgd_upload(server_round, reply.metadata.src_node_id, claimed_partition(dict(reply.content.get("metrics", {}))), indices, values)
            apply_upload(self.params, indices, values)
            self.stats.record(indices, server_round)
        return reason

    def global_model(self) -> torch.nn.Module:
        """The global model with the current flat parameters loaded into it."""
        assign_flat_parameters(self.model, self.params)
        return self.model


def exchange(grid: Grid, server: SelectiveServer, nodes: list[int], server_round: int, timeout_s: float) -> dict:
    """Send downloads to ``nodes`` (one batch), apply the valid uploads; what happened, per node."""
    messages = [server.download_message(node, server_round) for node in nodes]
    outcome = {"bytes_down": messages_nbytes(messages), "clients": [], "rejected": [], "failed": []}
    replies = {reply.metadata.src_node_id: reply for reply in grid.send_and_receive(messages, timeout=timeout_s)}
    for node in nodes:
        reply = replies.get(node)
        if reply is None or reply.has_error():
            why = "no reply within timeout" if reply is None else f"error: {reply.error.reason}"
            logger.warning("[dssgd] round %s: node %s skipped (%s)", server_round, node, why)
            outcome["failed"].append({"node": int(node), "reason": why, "bytes_up": 0 if reply is None else message_nbytes(reply)})
            continue
        # single numbers only: a list where the round row sums a number stopped the server
        metrics = {k: v for k, v in reply.content["metrics"].items() if not isinstance(v, list)} if "metrics" in reply.content.metric_records else {}
        metrics["partition-id"] = claimed_partition(metrics)
        bytes_up = message_nbytes(reply)  # the whole reply: upload, metrics, metadata
        reason = server.accept(reply, server_round)
        if reason is not None:
            logger.warning(f"[dssgd] round {server_round}: upload of node {node} rejected: {reason}")
            outcome["rejected"].append({"node": int(node), "partition": int(metrics.get("partition-id", -1)), "reason": reason})
        released = "upload" in reply.content  # what the participant sent spends its ε, accepted or not
        outcome["clients"].append({**metrics, "node": int(node), "bytes_up": bytes_up, "accepted": reason is None, "released": released})
    return outcome


def merge(outcomes: list[dict]) -> dict:
    """Combine the outcomes of several batches of replies into one (bytes summed, client lists joined)."""
    merged = {"bytes_down": 0, "clients": [], "rejected": [], "failed": []}
    for outcome in outcomes:
        merged["bytes_down"] += outcome["bytes_down"]
        for key in ("clients", "rejected", "failed"):
            merged[key] += outcome[key]
    return merged


def summarise(values: list[float], prefix: str) -> dict:
    """Mean, min and max of ``values`` under ``<prefix>_mean`` etc.; empty when there are none."""
    if not values:
        return {}
    return {f"{prefix}_mean": float(np.mean(values)), f"{prefix}_min": float(np.min(values)), f"{prefix}_max": float(np.max(values))}


class ParticipantLedger:
    """The latest accuracy, loss and cumulative ε of each participant (keyed by partition id).

    ``epsilon`` (DP-SGD) is the participant's own accountant. ``upload_epsilon_spent`` is
    counted here, by the server, from what it received: ε per upload times the number of
    uploads the participant sent (basic sequential composition of pure ε-DP releases),
    rejected ones included, since they were released too.

    Parameters
    ----------
    upload_epsilon : float or None
        ε of one upload (``protocol.upload_epsilon``); None when uploads are not private.
    """

    FIELDS = ("local_accuracy", "local_loss", "epsilon", "upload_epsilon_spent")

    def __init__(self, upload_epsilon: float | None = None):
        self.upload_epsilon = upload_epsilon
        self.latest: dict[str, dict[int, float]] = {field: {} for field in self.FIELDS}
        self.uploads: dict[int, list[float]] = {}

    def update(self, clients: list[dict]) -> None:
        """Take the latest metrics of each replying client and count the privacy budget of its released uploads."""
        for client in clients:
            partition = int(client["partition-id"])
            for field in ("local_accuracy", "local_loss", "epsilon"):
                if isinstance(client.get(field), (int, float)):  # a reply's metrics are untrusted
                    self.latest[field][partition] = float(client[field])
            if self.upload_epsilon is not None and client.get("released"):
                self.uploads.setdefault(partition, []).append(float(self.upload_epsilon))
                self.latest["upload_epsilon_spent"][partition] = compose_laplace_epsilon(self.uploads[partition])

    def values(self, field: str) -> list[float]:
        """The latest value of ``field`` for every client that reported it, in partition order."""
        return [value for _, value in sorted(self.latest[field].items())]


def round_row(server_round: int, outcome: dict, ledger: ParticipantLedger, evaluation: dict, wall_s: float) -> dict:
    """One metrics.jsonl row: the participants' local models (the paper's figure) and the global model."""
    clients = sorted(outcome["clients"], key=lambda c: c.get("partition-id", -1))
    local_accuracy = ledger.values("local_accuracy")
    row = metrics_row(
        server_round,
        accuracy=float(np.mean(local_accuracy)) if local_accuracy else None,
        loss=float(np.mean(ledger.values("local_loss"))) if ledger.values("local_loss") else None,
        bytes_up=sum(c["bytes_up"] for c in clients),
        bytes_down=outcome["bytes_down"],
        client_flops=sum(c.get("client_flops", 0) for c in clients),
        wall_s=wall_s,
        client_rows=clients,
        client_columns={
            "client_local_accuracy": "local_accuracy",
            "client_train_loss": "train_loss",
            "client_bytes_up": "bytes_up",
            "client_uploaded": "uploaded",
        },
        client_epsilon=ledger.values("epsilon"),
        **summarise(local_accuracy, "local_accuracy"),
        global_accuracy=evaluation["accuracy"],
        global_loss=evaluation["loss"],
        local_accuracy_all=local_accuracy,
        rejected=outcome["rejected"],
        failed=outcome["failed"],
        **{key: value for key, value in evaluation.items() if key.startswith("eval_")},  # eval.where=site: per-site figures
    )
    row["bytes_up"] += sum(f["bytes_up"] for f in outcome["failed"])  # refused replies crossed the wire too
    spent = ledger.values("upload_epsilon_spent")
    if spent:
        row["upload_epsilon_spent"], row["client_upload_epsilon_spent"] = max(spent), spent
    return row


def run(grid: Grid, run: ServerRun) -> dict:
    """Run DSSGD for the remaining rounds; returns extra summary fields."""
    cfg = run.cfg
    server = SelectiveServer(run)
    ledger = ParticipantLedger(cfg.protocol.upload_epsilon)
    nodes = run.in_site_order(wait_for_nodes(grid, cfg.num_clients, cfg.timeout_s))
    run.round_seconds()
    rejected_total = failed_total = 0
    for server_round in range(run.first_round, cfg.rounds + 1):
        chosen = server.participants(nodes, server_round)
        if cfg.protocol.order == "round_robin":  # sequential: each sees the uploads of those before it
            outcome = merge([exchange(grid, server, [node], server_round, cfg.timeout_s) for node in chosen])
        else:
            outcome = exchange(grid, server, chosen, server_round, cfg.timeout_s)
        ledger.update(outcome["clients"])
        if eval_where(cfg) == "site":  # the global model at every site, on its held-out rows
            evaluation = evaluate_at_sites(grid, run, nodes, server.global_model(), PROTOCOL, server_round)
        else:
            evaluation = run.evaluate(server.global_model())
        row = run.recorder.log_round(round_row(server_round, outcome, ledger, evaluation, run.round_seconds()))
        rejected_total += len(outcome["rejected"])
        failed_total += len(outcome["failed"])
        run.checkpoint(server_round, server.global_model(), {"stats": server.stats.state_dict(), "cursor": server.cursor})
        logger.info(
            f"[dssgd] round {server_round}/{cfg.rounds} local accuracy {row['accuracy'] or float('nan'):.4f} "
            f"global {evaluation['accuracy'] or float('nan'):.4f} up {row['bytes_up']} B"
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
        **({"upload_epsilon_spent": final["upload_epsilon_spent"]} if "upload_epsilon_spent" in final else {}),
    }


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
