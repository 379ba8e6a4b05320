"""FedAvg, the reference baseline: Flower's own strategy plus graftfl's metrics."""

from __future__ import annotations

import json
import logging
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from graftfl.config import eval_where
from graftfl.core.meter import metrics_row
from graftfl.core.wire import PRIVACY_HISTORIES, ROUND_OFFSET
from graftfl.protocols import ServerProtocol
from graftfl.strategies.replies import averaged_by_flower, reply_problem
from graftfl.strategies.utils import ServerRun, in_partition_order, site_evaluation_row, site_scores, wait_for_nodes
from graftfl.strategies.wire_bytes import message_nbytes, messages_nbytes

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
        self.rejected: list[str] = []  # replies refused this round (node and reason)
        self.reference: dict[str, np.ndarray] = {}  # the global model sent this round
        protocol = run.cfg.protocol
        self.max_examples = protocol.get("max_examples_per_site")
        self.max_update_norm = protocol.get("max_update_norm")
        self.site_evaluation: dict | None = None
        self.privacy_histories: dict[str, str] = dict((run.resume_state or {}).get("extra", {}).get("privacy_histories", {}))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's sampling and payload, sent as ``train.fedavg`` (and the downlink bytes counted)."""
        messages = self._routed(super().configure_train(server_round, arrays, config, grid))
        self.reference = {key: array.numpy() for key, array in arrays.items()}
        self.bytes_down = messages_nbytes(messages)  # config and arrays, every message
        self.sent = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's evaluation messages, sent as ``evaluate.fedavg``."""
        return self._routed(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """``eval.where=site``: pool the sites' held-out counts (weighted by count) and keep per-site figures."""
        replies = list(replies)
        scores, failures = site_scores(replies)
        if failures:
            logger.warning("[fedavg] round %d: %d site evaluation failure(s): %s", server_round, len(failures), "; ".join(failures))
        self.site_evaluation = site_evaluation_row(scores, failures)
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
        accepted, self.rejected, rejected_bytes = [], [], 0
        for reply in replies:
            if reply.has_error():
                continue
            problem = reply_problem(reply.content, self.reference, self.max_examples, self.max_update_norm)
            if problem is None:
                accepted.append(reply)
            else:
                self.rejected.append(f"node {reply.metadata.src_node_id}: {problem}")
                rejected_bytes += message_nbytes(reply)  # a refused reply travelled too
        if self.rejected:
            logger.warning("[fedavg] round %d: refused %d reply(ies): %s", server_round, len(self.rejected), "; ".join(self.rejected))
        if not accepted:
            # Flower would keep the old model and go on: a run in which nobody trains must stop, and say why.
            raise RuntimeError(f"round {server_round}: no client finished training ({'; '.join(self.client_errors + self.rejected)})")
        accepted = in_partition_order(accepted)  # Flower sums in the order given
        self.client_rows = [{**dict(reply.content["metrics"]), "bytes_up": message_nbytes(reply)} for reply in accepted]
        for reply in accepted if self.run.audit.enabled else ():  # audit.record: each site's update
            self.run.audit.fedavg_update(server_round, int(reply.content["metrics"].get("partition-id", -1)), {k: a.numpy() for k, a in reply.content["arrays"].items()}, self.reference)
        self.failed_bytes_up = sum(message_nbytes(reply) for reply in replies if reply.has_error()) + rejected_bytes  # error replies travel too
        for reply in accepted:
            if "privacy" in reply.content:
                partition_id = int(reply.content["metrics"]["partition-id"])
                self.privacy_histories[str(partition_id)] = reply.content["privacy"]["history"]
        arrays, metrics = super().aggregate_train(server_round, averaged_by_flower(accepted))
        return in_model_dtypes(arrays, self.reference), metrics


def in_model_dtypes(arrays: ArrayRecord | None, reference: dict[str, np.ndarray]) -> ArrayRecord | None:
    """Flower's average with each array back in the model's dtype.

    Flower multiplies every array by a float weight, so an integer buffer (BatchNorm's
    ``num_batches_tracked``) comes back float64; the next round's replies, int64 again, would
    then differ from the model sent and all be refused. Float arrays are returned as they are.
    """
    if arrays is None or all(arrays[key].dtype == str(reference[key].dtype) for key in arrays.keys()):
        return arrays
    return ArrayRecord({key: array if array.dtype == str(reference[key].dtype) else _in_dtype(array, reference[key].dtype)
                        for key, array in arrays.items()})


def _in_dtype(array: Array, dtype: np.dtype) -> Array:
    values = array.numpy()
    return Array(np.asarray(np.rint(values) if dtype.kind in "iub" else values).astype(dtype))  # a counter: the nearest count


def round_row(server_round: int, evaluation: dict, client_rows: list[dict], bytes_down: int, wall_s: float, client_errors: list[str] = (),
              failed_bytes_up: int = 0, rejected: list[str] = (), site_columns: dict | None = None) -> dict:
    """One metrics.jsonl row from the server evaluation and the clients' replies (failures and refused replies)."""
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
        rejected=len(rejected),
        rejected_reasons=list(rejected),
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
                        strategy.failed_bytes_up, strategy.rejected, site_columns)
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
    """The reply bounds, when set, are positive."""
    max_examples = cfg.protocol.get("max_examples_per_site")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"protocol.max_examples_per_site must be a positive integer or null, got {max_examples!r}")
    max_norm = cfg.protocol.get("max_update_norm")
    if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0):
        raise ValueError(f"protocol.max_update_norm must be a number > 0 or null, got {max_norm!r}")


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config)
