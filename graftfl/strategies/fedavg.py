"""FedAvg, the reference baseline: Flower's own strategy plus graftfl's metrics."""

from __future__ import annotations

import json
import logging
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from graftfl.config import eval_where
from graftfl.core.meter import metrics_row
from graftfl.core.wire import PRIVACY_HISTORIES, ROUND_OFFSET
from graftfl.protocols import ServerProtocol
from graftfl.strategies.utils import ServerRun, message_nbytes, site_evaluation_row, wait_for_nodes

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
        self.site_evaluation: dict | None = None
        self.privacy_histories: dict[str, str] = dict((run.resume_state or {}).get("extra", {}).get("privacy_histories", {}))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's sampling and payload, sent as ``train.fedavg`` (and the downlink bytes counted)."""
        messages = self._routed(super().configure_train(server_round, arrays, config, grid))
        self.bytes_down = sum(message_nbytes(message) for message in messages)  # config and arrays, every message
        self.sent = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._routed(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """``eval.where=site``: pool the sites' held-out counts (weighted by count) and keep per-site figures."""
        replies = list(replies)
        failures = [f"node {reply.metadata.src_node_id}: {reply.error.reason}" for reply in replies if reply.has_error()]
        if failures:
            logger.warning("[fedavg] round %d: %d site evaluation failure(s): %s", server_round, len(failures), "; ".join(failures))
        self.site_evaluation = site_evaluation_row([dict(reply.content["metrics"]) for reply in replies if not reply.has_error()], failures)
        if self.site_evaluation["accuracy"] is None:
            return None
        return MetricRecord({"accuracy": self.site_evaluation["accuracy"], "loss": self.site_evaluation["loss"]})

    @staticmethod
    def _routed(messages: Iterable[Message]) -> list[Message]:
        # Flower sends plain "train"/"evaluate"; the graftfl ClientApp routes "<category>.<protocol>".
        return [
            Message(content=message.content, dst_node_id=message.metadata.dst_node_id, message_type=f"{message.metadata.message_type}.{PROTOCOL}")
            for message in messages
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
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
              failed_bytes_up: int = 0, site_columns: dict | None = None) -> dict:
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
        **(site_columns or {}),
    )


def run(grid: Grid, run: ServerRun) -> dict:
    """Run FedAvg for the remaining rounds; returns extra summary fields."""
    cfg = run.cfg
    model = run.new_model()
    offset = run.first_round - 1
    wait_for_nodes(grid, cfg.num_clients, cfg.timeout_s)
    at_sites = eval_where(cfg) == "site"
    strategy = FedAvgWithMetrics(
        run,
        fraction_train=cfg.protocol.fraction_train,
        # eval.where=server: the server evaluates the global model on its test set; site: every site on its held-out rows
        fraction_evaluate=1.0 if at_sites else 0.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.num_clients,
    )

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            run.round_seconds()
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        site_columns = None
        if at_sites:  # Flower ran configure/aggregate_evaluate just before this call
            site_columns = dict(strategy.site_evaluation or site_evaluation_row([], ["no site evaluated"]))
            evaluation = {"accuracy": site_columns.pop("accuracy"), "loss": site_columns.pop("loss")}
        else:
            evaluation = run.evaluate(model)
        row = round_row(offset + server_round, evaluation, strategy.client_rows, strategy.bytes_down, run.round_seconds(), strategy.client_errors,
                        strategy.failed_bytes_up, site_columns)
        run.recorder.log_round(row)
        run.checkpoint(offset + server_round, model, {"privacy_histories": strategy.privacy_histories})
        accuracy = "n/a" if evaluation["accuracy"] is None else f"{evaluation['accuracy']:.4f}"
        logger.info("[fedavg] round %d/%d accuracy %s", offset + server_round, cfg.rounds, accuracy)
        if evaluation["accuracy"] is None:
            return None
        return MetricRecord({"accuracy": evaluation["accuracy"], "loss": evaluation["loss"]})

    remaining = cfg.rounds - offset
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=remaining,
            timeout=cfg.timeout_s,
            train_config=run.config_record(**{PRIVACY_HISTORIES: json.dumps(strategy.privacy_histories), ROUND_OFFSET: offset}),
            evaluate_config=run.config_record(),
            evaluate_fn=evaluate_global,
        )
    return {}


def validate_config(cfg) -> None:
    """No checks beyond the shared ones in :func:`graftfl.config.validate`."""


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
