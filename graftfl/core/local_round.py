"""One round of local training outside Flower (the centralized and standalone baselines).

The same steps as ``graftfl.clients.utils.local_train`` — the shared core loop,
DP-SGD through Opacus when ``privacy=dpsgd`` — but the accountant history is
passed in and returned instead of living in a Flower ``context.state``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from graftfl.core.data import DatasetSplits, make_loader, partition_indices
from graftfl.core.meter import count_train_flops
from graftfl.core.privacy import History, PrivateTraining, dpsgd_config_from
from graftfl.core.train import make_optimizer, train


def train_round(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: DictConfig,
    *,
    seed: int,
    device: torch.device,
    history: History | None = None,
) -> tuple[dict[str, float], History]:
    """Train ``model`` for one round (``train.local_epochs`` or ``train.local_steps``).

    Returns the metrics (``train_loss``, ``steps``, ``samples`` and, with DP-SGD,
    the cumulative ``epsilon``) and the updated accountant history.
    """
    torch.manual_seed(seed)
    loader = make_loader(x, y, cfg.train.batch_size, shuffle=True, seed=seed)
    optimizer = make_optimizer(cfg.train.optimizer, model.parameters(), cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay)
    dp_config = dpsgd_config_from(cfg.privacy, planned_epochs=cfg.rounds * cfg.train.local_epochs)
    loop = dict(device=device, epochs=cfg.train.local_epochs, max_steps=cfg.train.local_steps)
    if dp_config is None:
        result = train(model, loader, optimizer, **loop)
        return {"train_loss": result["loss"], "steps": result["steps"], "samples": result["samples"]}, list(history or [])
    private = PrivateTraining(dp_config, history)
    dp_model, dp_optimizer, dp_loader = private.attach(model, optimizer, loader)
    result = train(dp_model, dp_loader, dp_optimizer, **loop)
    dp_model._close()  # drop Opacus hooks: the same model is made private again next round
    metrics = {"train_loss": result["loss"], "steps": result["steps"], "samples": result["samples"], "epsilon": private.epsilon()}
    return metrics, private.history


def partition_data(data: DatasetSplits, cfg: DictConfig, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Participant ``partition_id``'s training samples, exactly as a Flower client would hold them."""
    indices = torch.from_numpy(partition_indices(data.train_y, cfg.partition, int(cfg.num_clients), partition_id, int(cfg.seed)))
    return data.train_x[indices], data.train_y[indices]


def train_flops_per_sample(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward FLOPs of one training sample of ``model``."""
    return count_train_flops(model, x[:2], torch.nn.functional.cross_entropy, y[:2]) / len(x[:2])
