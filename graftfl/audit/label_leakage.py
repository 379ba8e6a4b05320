"""Labels from the per-example gradients a split server sees (Li et al., ICLR 2022).

In U-shaped split learning the labels and the loss stay at the site, but the server still
receives, per example, the gradient of the loss with respect to the output of its middle
part (and it sends back the gradient with respect to the cut activations). For a
softmax/sigmoid head these gradients are ``(p - y) W``-shaped, so they carry the label:

- **norm score** — on an imbalanced binary task the model is less confident on the
  minority (positive) class, so ``|p - y|`` and the gradient norm are larger there. The
  score is the norm itself; ROC AUC against the true labels measures the leak.
- **direction score** — gradients of two examples of the same class point the same way,
  of opposite classes opposite ways. With one gradient whose label the attacker knows
  (e.g. an example it planted or knows), the cosine similarity to it is the score.
- **gradient clustering** (multi-class) — k-means on normalised gradients, clusters
  matched to classes with the Hungarian algorithm (the matching that maximises
  agreement, as an attacker knowing the class sizes could do); the figure is the
  accuracy of that labelling.

Functions take ``(N, ...)`` gradient tensors, one row per example, as the server
recorded them.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from graftfl.audit.metrics import roc_auc


def _rows(gradients: torch.Tensor) -> torch.Tensor:
    if gradients.ndim < 2 or len(gradients) == 0:
        raise ValueError(f"expected per-example gradients shaped (N, ...), got shape {tuple(gradients.shape)}")
    return gradients.detach().reshape(len(gradients), -1).double()


def norm_scores(gradients: torch.Tensor) -> np.ndarray:
    """Li et al.'s norm score: the L2 norm of each example's gradient (higher: more likely positive)."""
    return _rows(gradients).norm(dim=1).numpy()


def direction_scores(gradients: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Li et al.'s direction score: cosine similarity of each gradient to ``reference``.

    Parameters
    ----------
    gradients : torch.Tensor
        Per-example gradients, ``(N, ...)``.
    reference : torch.Tensor
        One gradient of an example the attacker knows to be *positive* (shape ``(...)``).
        For a negative reference, negate the scores.
    """
    rows = _rows(gradients)
    ref = reference.detach().reshape(-1).double()
    if ref.numel() != rows.shape[1]:
        raise ValueError(f"reference has {ref.numel()} values, each gradient has {rows.shape[1]}")
    return torch.nn.functional.cosine_similarity(rows, ref[None, :], dim=1).numpy()


def norm_attack_auc(gradients: torch.Tensor, labels: torch.Tensor, positive: int = 1) -> float:
    """ROC AUC of the norm score for recovering ``labels == positive``."""
    return roc_auc(_labels(labels) == positive, norm_scores(gradients))


def direction_attack_auc(gradients: torch.Tensor, labels: torch.Tensor, reference_index: int, positive: int = 1) -> float:
    """ROC AUC of the direction score, the attacker knowing the label of example ``reference_index``.

    The reference example is left out of the AUC (its label was given, not recovered).
    """
    truth = _labels(labels) == positive
    scores = direction_scores(gradients, gradients[reference_index])
    if not truth[reference_index]:
        scores = -scores
    keep = np.arange(len(truth)) != reference_index
    return roc_auc(truth[keep], scores[keep])


def cluster_label_accuracy(gradients: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0) -> float:
    """Accuracy of labels recovered by k-means on normalised gradients, clusters matched to classes (Hungarian).

    Parameters
    ----------
    gradients : torch.Tensor
        Per-example gradients, ``(N, ...)``.
    labels : torch.Tensor
        True labels (used only to score the matching, as the audit knows them).
    num_classes : int
        Number of clusters (the class count is public in the run config).
    seed : int
        k-means initialisation.
    """
    truth = _labels(labels)
    rows = torch.nn.functional.normalize(_rows(gradients), dim=1).numpy()
    clusters = KMeans(n_clusters=num_classes, n_init=10, random_state=seed).fit_predict(rows)
    agreement = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(agreement, (clusters, truth), 1)
    cluster_index, class_index = linear_sum_assignment(agreement, maximize=True)
    return float(agreement[cluster_index, class_index].sum() / len(truth))


def chance_cluster_accuracy(labels: torch.Tensor) -> float:
    """The accuracy of always guessing the most frequent class: the floor clustering must beat."""
    truth = _labels(labels)
    return float(np.bincount(truth).max() / len(truth))


def head_gradients(head: torch.nn.Module, middle_outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The gradients a U-shaped site sends the server: d(mean cross-entropy)/d(middle output), per example.

    Use it to reproduce what a server recorded when only the tensors, not the
    recording, are at hand (tests, a local audit of a checkpoint).
    """
    outputs = middle_outputs.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(head(outputs), labels.long())
    (gradient,) = torch.autograd.grad(loss, outputs)
    return gradient.detach()


def gaussian_gradient_noise(gradients: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """The DP-style defence: Gaussian noise added to each per-example gradient before it leaves the site."""
    generator = torch.Generator().manual_seed(seed)
    return gradients + std * torch.randn(gradients.shape, generator=generator, dtype=gradients.dtype)


def _labels(labels) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return array.astype(np.int64).reshape(-1)
