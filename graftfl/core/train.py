"""Train and evaluate loops shared by every protocol, device choice and seeding."""

from __future__ import annotations

import os
import random
import sys
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from graftfl.core.overlap import overlapping


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_torch(seed: int, device: torch.device | None = None) -> None:
    """``torch.manual_seed(seed)``, less its accelerator part when the work runs on ``device="cpu"``.

    ``torch.manual_seed`` also seeds CUDA, XPU and MTIA; while one is not initialised
    torch defers that seed and records the caller's stack for a later error message,
    about a millisecond per call under a simulation's deep stack, which every client
    message paid. Work on the CPU draws only from the CPU generator, which both calls
    seed the same way. ``device=None`` (unknown): the full ``torch.manual_seed``.
    """
    if device is not None and torch.device(device).type == "cpu":
        torch.default_generator.manual_seed(int(seed))
    else:
        torch.manual_seed(int(seed))


def seed_everything(seed: int, deterministic: bool = True, device: torch.device | None = None) -> None:
    """Seed Python, NumPy and torch (:func:`seed_torch` for ``device``); with ``deterministic`` ask torch for
    deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    seed_torch(seed, device)
    if deterministic:
        deterministic_kernels()


def deterministic_kernels() -> None:
    """Ask torch for deterministic kernels (a warning, not an error, where an op has none).

    cuBLAS is deterministic only with a fixed workspace (PyTorch's reproducibility notes):
    without ``CUBLAS_WORKSPACE_CONFIG`` every CUDA matrix product also raised that warning.
    The variable counts only before CUDA's first matrix product in the process; one the
    user set is kept.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """SGD or Adam by name (the two the source papers use)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; valid optimizers: ['adam', 'sgd']")


def optimizer_from_config(train_cfg, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer the run config's ``train`` group names, over ``params``.

    Parameters
    ----------
    train_cfg : DictConfig
        ``cfg.train`` (``optimizer``, ``lr``, ``momentum``, ``weight_decay``).
    params : iterable of nn.Parameter
        What the optimizer steps.
    """
    return make_optimizer(train_cfg.optimizer, params, train_cfg.lr, train_cfg.momentum, train_cfg.weight_decay)


def round_seed(seed: int, server_round: int, partition_id: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, round, participant) for one round of local training."""
    return int(seed) * 1_000_003 + int(server_round) * 1_009 + int(partition_id)


def progress(iterable, *, desc: str, enabled: bool, total: int | None = None):
    """Wrap a long loop in a progress bar (stderr) when ``enabled``."""
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, file=sys.stderr)


def train(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epochs: int = 1,
    max_steps: int | None = None,
    loss_fn: Callable = nn.functional.cross_entropy,
    show_progress: bool = False,
) -> dict[str, float]:
    """Train ``model`` for ``epochs`` passes over ``loader`` (or ``max_steps`` steps).

    Returns the mean training loss, the number of optimizer steps and of samples.
    """
    model.to(device).train()
    steps, samples = 0, 0
    # summed where the loss is (in float64, as a Python float would): reading it every step would wait for the GPU
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for epoch in range(epochs):
        for x, y in progress(loader, desc=f"train epoch {epoch + 1}", enabled=show_progress):
            if max_steps is not None and steps >= max_steps:
                break
            # Poisson sampling (DP-SGD) can draw an empty batch. It still takes its step, as in Opacus:
            # the optimizer adds noise to a zero gradient sum and the accountant counts the step, so the
            # recorded history describes the mechanism that ran (skipping it would leak the batch size).
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            steps += 1
            if len(y):  # the mean loss of an empty batch is NaN
                samples += len(y)
                loss_sum += loss.detach().double() * len(y)
    return {"loss": loss_sum.item() / max(samples, 1), "steps": steps, "samples": samples}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device, batch_size: int = 1024, num_classes: int | None = None) -> dict:
    """Loss, accuracy and per-class accuracy of ``model`` on ``(x, y)``."""
    model.to(device).eval()
    loss_sum, predictions = 0.0, []
    with overlapping(model):  # no random draw: another simulated client may run meanwhile
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
            logits = model(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            predictions.append(logits.argmax(dim=1).cpu())
        predicted = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
        correct = predicted == y
        classes = num_classes or int(y.max()) + 1
        per_class = [float(correct[y == c].float().mean()) if (y == c).any() else float("nan") for c in range(classes)]
    return {"loss": loss_sum / max(len(y), 1), "accuracy": float(correct.float().mean()), "per_class_accuracy": per_class}
