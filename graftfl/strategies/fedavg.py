"""FedAvg, the reference baseline: Flower's own strategy plus graftfl's metrics."""

from __future__ import annotations

import json
import logging
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from graftfl.core.meter import metrics_row
from graftfl.core.wire import PRIVACY_HISTORIES, ROUND_OFFSET
from graftfl.protocols import ServerProtocol
from graftfl.strategies.utils import ServerRun, message_nbytes, wait_for_nodes

PROTOCOL = "fedavg"
logger = logging.getLogger(__name__)


class FedAvgWithMetrics(FedAvg):
    """Flower's FedAvg, routed to ``train.fedavg`` and recording per-client traffic.

    Parameters
    ----------
    run : ServerRun
        The run whose recorder receives one row per round.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` unchanged.
    """

    def __init__(self, run: ServerRun, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        self.run = run
        self.client_rows: list[dict] = []
        self.client_errors: list[str] = []
        self.bytes_down = 0
        self.failed_bytes_up = 0
        self.sent = 0
        self.privacy_histories: dict[str, str] = dict((run.resume_state or {}).get("extra", {}).get("privacy_histories", {}))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's sampling and payload, sent as ``train.fedavg`` (and the downlink bytes counted)."""
        messages = self._routed(super().configure_train(server_round, arrays, config, grid))
        self.bytes_down = sum(message_nbytes(message) for message in messages)  # config and arrays, every message
        self.sent = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's evaluation messages, sent as ``evaluate.fedavg``."""
        return self._routed(super().configure_evaluate(server_round, arrays, config, grid))

    @staticmethod
    def _routed(messages: Iterable[Message]) -> list[Message]:
        # Flower sends plain "train"/"evaluate"; the graftfl ClientApp routes "<category>.<protocol>".
        return [
            Message(content=message.content, dst_node_id=message.metadata.dst_node_id, message_type=f"{message.metadata.message_type}.{PROTOCOL}")
            for message in messages
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Record failures, per-client metrics, uplink bytes and privacy histories, then let Flower average.

        A round in which no client finished training raises, so that the run stops and says why.
        """
        replies = list(replies)
        self.client_errors = [f"node {reply.metadata.src_node_id}: {reply.error.reason}" for reply in replies if reply.has_error()]
        missing = self.sent - len(replies)
        if missing > 0:
            self.client_errors.append(f"{missing} client(s) did not reply within timeout_s")
        if self.client_errors:
            logger.warning("[fedavg] round %d: %d client failure(s): %s", server_round, len(self.client_errors), "; ".join(self.client_errors))
        if not any(not reply.has_error() for reply in replies):
            # Flower would keep the old model and go on: a run in which nobody trains must stop, and say why.
            raise RuntimeError(f"round {server_round}: no client finished training ({'; '.join(self.client_errors)})")
        self.client_rows = [{**dict(reply.content["metrics"]), "bytes_up": message_nbytes(reply)} for reply in replies if not reply.has_error()]
        self.failed_bytes_up = sum(message_nbytes(reply) for reply in replies if reply.has_error())  # error replies travel too
        for reply in replies:
            if not reply.has_error() and "privacy" in reply.content:
                partition_id = int(reply.content["metrics"]["partition-id"])
                self.privacy_histories[str(partition_id)] = reply.content["privacy"]["history"]
        return super().aggregate_train(server_round, replies)


def round_row(server_round: int, evaluation: dict, client_rows: list[dict], bytes_down: int, wall_s: float, client_errors: list[str] = (),
              failed_bytes_up: int = 0) -> dict:
    """One metrics.jsonl row from the server evaluation and the clients' replies (and failures)."""
    by_client = sorted(client_rows, key=lambda r: r.get("partition-id", 0))
    return metrics_row(
        server_round,
        accuracy=evaluation["accuracy"],
        loss=evaluation["loss"],
        bytes_up=sum(r["bytes_up"] for r in by_client) + failed_bytes_up,
        bytes_down=bytes_down,
        client_flops=sum(r.get("client_flops", 0) for r in by_client),
        wall_s=wall_s,
        client_rows=by_client,
        client_columns={"client_train_loss": "train_loss", "client_bytes_up": "bytes_up"},
        client_epsilon=[r["epsilon"] for r in by_client if "epsilon" in r],
        failed_clients=len(client_errors),
        client_errors=list(client_errors),
    )


def run(grid: Grid, run: ServerRun) -> dict:
    """Run FedAvg for the remaining rounds; returns extra summary fields."""
    cfg = run.cfg
    model = run.new_model()
    offset = run.first_round - 1
    wait_for_nodes(grid, cfg.num_clients, cfg.timeout_s)
    strategy = FedAvgWithMetrics(
        run,
        fraction_train=cfg.protocol.fraction_train,
        fraction_evaluate=0.0,  # the server evaluates the global model on its test set
        min_train_nodes=1,
        min_available_nodes=cfg.num_clients,
    )

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            run.round_seconds()
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        evaluation = run.evaluate(model)
        row = round_row(offset + server_round, evaluation, strategy.client_rows, strategy.bytes_down, run.round_seconds(), strategy.client_errors,
                        strategy.failed_bytes_up)
        run.recorder.log_round(row)
        run.checkpoint(offset + server_round, model, {"privacy_histories": strategy.privacy_histories})
        logger.info("[fedavg] round %d/%d accuracy %.4f", offset + server_round, cfg.rounds, evaluation["accuracy"])
        return MetricRecord({"accuracy": evaluation["accuracy"], "loss": evaluation["loss"]})

    remaining = cfg.rounds - offset
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=remaining,
            timeout=cfg.timeout_s,
            train_config=run.config_record(**{PRIVACY_HISTORIES: json.dumps(strategy.privacy_histories), ROUND_OFFSET: offset}),
            evaluate_fn=evaluate_global,
        )
    return {}


def validate_config(cfg) -> None:
    """No checks beyond the shared ones in :func:`graftfl.config.validate`."""


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
