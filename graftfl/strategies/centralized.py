"""Centralized baseline: one model on the union of the participants' partitions, no Flower.

It writes the same run directory as the federated protocols (zero traffic), so
``protocol=centralized`` sits in the same table as ``dssgd`` and ``standalone``.
"""

from __future__ import annotations

import logging
import torch

from graftfl.core.local_round import partition_data, train_round
from graftfl.core.meter import metrics_row, train_flops_per_sample
from graftfl.protocols import ServerProtocol
from graftfl.strategies.utils import ServerRun

PROTOCOL = "centralized"
logger = logging.getLogger(__name__)


def union_of_partitions(run: ServerRun) -> tuple[torch.Tensor, torch.Tensor]:
    """Every participant's training samples pooled (the data a trusted curator would hold)."""
    parts = [partition_data(run.data, run.cfg, pid) for pid in range(int(run.cfg.num_clients))]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def run(grid, run: ServerRun) -> dict:
    """Train for ``rounds`` rounds of ``train.local_epochs`` over the pooled data."""
    cfg = run.cfg
    x, y = union_of_partitions(run)
    model = run.new_model()
    flops = train_flops_per_sample(model, x, torch.nn.functional.cross_entropy, y)
    history = list((run.resume_state or {}).get("extra", {}).get("privacy_history", []))
    run.round_seconds()
    for server_round in range(run.first_round, cfg.rounds + 1):
        # Not core.train.round_seed: this baseline's seeds (and the published ko_table4 numbers) predate it.
        seed = int(cfg.seed) * 1_000_003 + server_round
        metrics, history = train_round(model, x, y, cfg, seed=seed, device=run.device, history=history)
        evaluation = run.evaluate(model)
        row = metrics_row(
            server_round,
            accuracy=evaluation["accuracy"],
            loss=evaluation["loss"],
            bytes_up=0,
            bytes_down=0,
            client_flops=flops * metrics["samples"],
            wall_s=run.round_seconds(),
            epsilon=metrics.get("epsilon"),
            train_loss=metrics["train_loss"],
            samples=len(y),
        )
        run.recorder.log_round(row)
        run.checkpoint(server_round, model, {"privacy_history": history})
        logger.info(f"[centralized] round {server_round}/{cfg.rounds} accuracy {evaluation['accuracy']:.4f}")
    return {"train_samples": len(y)}


def validate_config(cfg) -> None:
    """No checks beyond the shared ones in :func:`graftfl.config.validate`."""


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config, federated=False)
