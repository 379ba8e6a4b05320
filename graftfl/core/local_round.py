"""One round of local training: the loop every protocol that trains a whole model locally runs.

The shared core loop, DP-SGD through Opacus when ``privacy=dpsgd``. The
accountant history is passed in and returned: the Flower clients keep it in
their ``context.state`` (``graftfl.clients.utils.local_train``), the
centralized and standalone baselines in memory and their checkpoints.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from graftfl.core.data import DatasetSplits, make_loader, per_row_loader
from graftfl.core.overlap import overlapping
from graftfl.core.partition import partition_indices
from graftfl.core.privacy import History, PrivateTraining, dpsgd_config_from
from graftfl.core.train import optimizer_from_config, seed_torch, train


def train_round(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: DictConfig,
    *,
    seed: int,
    device: torch.device,
    history: History | None = None,
    show_progress: bool = False,
) -> tuple[dict[str, float], History]:
    """Train ``model`` for one round (``train.local_epochs`` or ``train.local_steps``).

    Returns the metrics (``train_loss``, ``steps``, ``samples`` and, with DP-SGD,
    the cumulative ``epsilon``) and the updated accountant history.
    """
    seed_torch(seed, device)
    dp_config = dpsgd_config_from(cfg.privacy, planned_epochs=cfg.rounds * cfg.train.local_epochs)
    if dp_config is None and device.type == "cuda":  # one copy of the rows to the device, not one per batch
        x, y = x.to(device), y.to(device)
    loader = (make_loader if dp_config is None else per_row_loader)(x, y, cfg.train.batch_size, shuffle=True, seed=seed)
    optimizer = optimizer_from_config(cfg.train, model.parameters())
    loop = dict(device=device, epochs=cfg.train.local_epochs, max_steps=cfg.train.local_steps,
                show_progress=show_progress)
    if dp_config is None:
        with overlapping(model):  # batches from the loader's own generator: another simulated client may run meanwhile
            result = train(model, loader, optimizer, **loop)
        return {"train_loss": result["loss"], "steps": result["steps"], "samples": result["samples"]}, list(history or [])
    model.train()  # Opacus refuses a model in eval mode, as a baseline's model is after last round's evaluation
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
