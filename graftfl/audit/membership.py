"""Membership inference on a final model: was this record in some site's training data?

Two attacks, both scored with ROC AUC and the TPR at 1% FPR (Carlini et al., S&P 2022,
argue the low-FPR figure is the one that matters):

- :func:`loss_threshold_scores` — Yeom et al. (2018): members have lower loss; the score
  is the negative cross-entropy.
- :func:`offline_lira_scores` — offline LiRA (Carlini et al. 2022, §VI-C): train shadow
  models on auxiliary data (none of them saw the target records, so all are "OUT"
  models), fit a Gaussian to each record's logit-scaled confidence over the shadows, and
  score the target model's confidence by its one-sided likelihood under that Gaussian.

The caller supplies the protocol's trainer as ``train_fn(x, y, seed) -> nn.Module``, so the
shadows are trained the way the audited run trained (same model, epochs, optimiser).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from graftfl.audit.metrics import roc_auc, tpr_at_fpr

logger = logging.getLogger(__name__)

TrainFn = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double()


def loss_threshold_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Membership scores of the loss attack: ``-cross_entropy`` per record (higher: more likely a member)."""
    return (-nn.functional.cross_entropy(_logits(model, x), y.long(), reduction="none")).numpy()


def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """LiRA's statistic: ``log(p_y) - log(1 - p_y)`` of the true class, computed stably from the logits."""
    logits = _logits(model, x)
    true = logits.gather(1, y.long()[:, None])[:, 0]
    others = logits.scatter(1, y.long()[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


def train_shadow_models(train_fn: TrainFn, aux_x: torch.Tensor, aux_y: torch.Tensor, *, num_shadows: int = 8,
                        fraction: float = 0.5, seed: int = 0) -> list[nn.Module]:
    """Train ``num_shadows`` models, each on a random ``fraction`` of the auxiliary data.

    Parameters
    ----------
    train_fn : callable
        ``train_fn(x, y, seed) -> nn.Module``: the audited protocol's training, on the given data.
    aux_x, aux_y : torch.Tensor
        The attacker's auxiliary data, disjoint from every site's data.
    num_shadows : int
        How many shadows (Carlini et al. use 64+ offline; a handful already separates an
        overfitted model).
    fraction : float
        Share of the auxiliary data each shadow trains on (varies the shadows like the
        target's own sampling varies it).
    seed : int
        Seeds the subsets; shadow ``k`` gets ``seed + k``.
    """
    if num_shadows < 2:
        raise ValueError(f"offline LiRA needs at least 2 shadow models to fit a variance, got num_shadows={num_shadows}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    size = max(1, round(fraction * len(aux_x)))
    shadows = []
    for k in range(num_shadows):
        subset = torch.randperm(len(aux_x), generator=generator)[:size]
        shadows.append(train_fn(aux_x[subset], aux_y[subset], seed + k))
        logger.debug("shadow %d/%d trained on %d auxiliary records", k + 1, num_shadows, size)
    return shadows


def offline_lira_scores(target_model: nn.Module, shadow_models: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                        *, global_variance: bool = True) -> np.ndarray:
    """Offline LiRA membership scores (higher: more likely a member).

    For each record, ``phi`` is the target model's logit-scaled confidence; the OUT
    distribution is a Gaussian fitted to the shadows' ``phi`` on the same record. The
    score is ``log P[Z <= phi]`` under that Gaussian (a member's confidence sits in the
    upper tail).

    Parameters
    ----------
    global_variance : bool
        One variance for all records (Carlini et al. recommend it with few shadows).
    """
    if len(shadow_models) < 2:
        raise ValueError("offline LiRA needs at least 2 shadow models")
    out = np.stack([logit_confidence(shadow, x, y) for shadow in shadow_models])  # (shadows, records)
    mean = out.mean(axis=0)
    std = np.full_like(mean, out.std(axis=0).mean()) if global_variance else out.std(axis=0)
    target = logit_confidence(target_model, x, y)
    return norm.logcdf(target, loc=mean, scale=np.maximum(std, 1e-6))


def membership_report(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = 0.01) -> dict[str, float]:
    """``{"auc", "tpr_at_fpr", "fpr"}`` of separating members from non-members by score."""
    truth = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    scores = np.concatenate([member_scores, nonmember_scores])
    return {"auc": roc_auc(truth, scores), "tpr_at_fpr": tpr_at_fpr(truth, scores, fpr), "fpr": fpr}
