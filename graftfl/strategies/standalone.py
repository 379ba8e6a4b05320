"""Standalone baseline: every participant trains only on its own data (θu = 0), no Flower.

Each participant's model is evaluated on the server test set every round, as
for ``dssgd`` (mean, min, max), so the table shows what collaboration adds.
"""

from __future__ import annotations

import logging
import numpy as np
import torch

from graftfl.core.local_round import partition_data, train_round
from graftfl.core.meter import metrics_row, train_flops_per_sample
from graftfl.core.train import round_seed
from graftfl.protocols import ServerProtocol
from graftfl.strategies.utils import ServerRun

PROTOCOL = "standalone"
logger = logging.getLogger(__name__)


def run(grid, run: ServerRun) -> dict:
    """Train every participant's own model for ``rounds`` local rounds."""
    cfg = run.cfg
    if run.resume_state:
        raise ValueError("protocol=standalone does not resume: it keeps one model per participant in memory")
    participants = range(int(cfg.num_clients))
    data = {pid: partition_data(run.data, cfg, pid) for pid in participants}
    models = {pid: run.new_model() for pid in participants}  # the same initial weights as dssgd
    histories: dict[int, list] = {pid: [] for pid in participants}
    flops = train_flops_per_sample(models[0], data[0][0], torch.nn.functional.cross_entropy, data[0][1])
    run.round_seconds()
    for server_round in range(1, cfg.rounds + 1):
        accuracy, loss, train_loss, epsilon, samples = [], [], [], [], 0
        for pid in participants:
            x, y = data[pid]
            seed = round_seed(cfg.seed, server_round, pid)
            metrics, histories[pid] = train_round(models[pid], x, y, cfg, seed=seed, device=run.device, history=histories[pid])
            evaluation = run.evaluate(models[pid])
            accuracy.append(evaluation["accuracy"])
            loss.append(evaluation["loss"])
            train_loss.append(metrics["train_loss"])
            samples += metrics["samples"]
            if "epsilon" in metrics:
                epsilon.append(metrics["epsilon"])
        row = metrics_row(
            server_round,
            accuracy=float(np.mean(accuracy)),
            loss=float(np.mean(loss)),
            bytes_up=0,
            bytes_down=0,
            client_flops=flops * samples,
            wall_s=run.round_seconds(),
            client_epsilon=epsilon,
            local_accuracy_mean=float(np.mean(accuracy)),
            local_accuracy_min=float(np.min(accuracy)),
            local_accuracy_max=float(np.max(accuracy)),
            clients=list(participants),
            client_local_accuracy=accuracy,
            client_train_loss=train_loss,
        )
        run.recorder.log_round(row)
        run.checkpoint(server_round, models[0], {"participants": {pid: m.state_dict() for pid, m in models.items()}})
        logger.info(f"[standalone] round {server_round}/{cfg.rounds} mean local accuracy {row['accuracy']:.4f}")
    final = run.recorder.rows[-1]
    return {"local_accuracy_min": final["local_accuracy_min"], "local_accuracy_max": final["local_accuracy_max"]}


def validate_config(cfg) -> None:
    """No checks beyond the shared ones in :func:`graftfl.config.validate`."""


SERVER_PROTOCOL = ServerProtocol(name=PROTOCOL, run=run, validate_config=validate_config, federated=False)
