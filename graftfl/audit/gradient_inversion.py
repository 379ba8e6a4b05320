"""Inputs and labels from DSSGD uploads: a sparse, clipped, maybe noised fraction θu of a site's update.

The server of ``protocol=dssgd`` receives, per round and site, ``(indices, values)`` of the
flat parameter update (:class:`graftfl.core.selective.Upload`). After one local SGD step
the update is ``-lr * gradient``, so the classic gradient attacks apply to the uploaded
coordinates only:

- :func:`idlg_label` — iDLG (Zhao, Mopuri & Bilen 2020): for cross-entropy on one example
  the last layer's bias gradient is ``softmax - onehot``, negative only at the true class;
  without the bias, the true class's weight row has a negative sum when the layer's input
  is non-negative (after a ReLU).
- :func:`analytic_fc_input` — a fully connected layer ``y = W x + b`` has
  ``dL/dW_i = dL/db_i * x``, so ``x = dW_i / db_i`` for any row ``i`` with ``db_i != 0``
  (Phong et al. 2017; exact for a batch of one). Only uploaded coordinates are used.
- :func:`invert_gradients` — Geiping et al. (NeurIPS 2020): optimise a dummy input so that
  its gradient has the highest cosine similarity to the observed one on the uploaded
  coordinates, with a total-variation prior.

Gradients are lists of tensors in ``model.parameters()`` order; masks are boolean lists of
the same shapes (True: the coordinate was uploaded). :func:`upload_to_gradients` turns a
protocol upload into both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from graftfl.audit.split_inversion import total_variation
from graftfl.core.selective import Upload

logger = logging.getLogger(__name__)


def upload_to_gradients(model: nn.Module, upload: Upload, learning_rate: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-parameter gradient estimates and upload masks from a DSSGD upload.

    ``gradient = -update / learning_rate`` on uploaded coordinates (exact after one
    local SGD step; after several it is their sum), zero elsewhere.

    Returns
    -------
    tuple of lists
        ``(gradients, masks)`` in ``model.parameters()`` order.
    """
    total = sum(p.numel() for p in model.parameters())
    flat = torch.zeros(total)
    mask = torch.zeros(total, dtype=torch.bool)
    indices = upload.indices.long()
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= total):
        raise ValueError(f"upload indices must lie in [0, {total}) for this model")
    flat[indices] = -upload.values.float() / float(learning_rate)
    mask[indices] = True
    gradients, masks, offset = [], [], 0
    for param in model.parameters():
        size = param.numel()
        gradients.append(flat[offset : offset + size].reshape(param.shape))
        masks.append(mask[offset : offset + size].reshape(param.shape))
        offset += size
    return gradients, masks


def model_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the mean cross-entropy of ``model`` on ``(x, y)``, in ``parameters()`` order."""
    loss = nn.functional.cross_entropy(model(x), y.long())
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def idlg_label(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None = None,
               weight_mask: torch.Tensor | None = None, bias_mask: torch.Tensor | None = None) -> int | None:
    """iDLG: the label of a single example from the last layer's gradient.

    Parameters
    ----------
    weight_grad : torch.Tensor
        ``(num_classes, features)`` gradient of the last layer's weight.
    bias_grad : torch.Tensor, optional
        ``(num_classes,)`` gradient of its bias.
    weight_mask, bias_mask : torch.Tensor, optional
        Which coordinates were uploaded (default: all).

    Returns
    -------
    int or None
        The recovered class, or None when no uploaded coordinate singles one out.
    """
    if bias_grad is not None:
        uploaded = torch.ones_like(bias_grad, dtype=torch.bool) if bias_mask is None else bias_mask
        negative = uploaded & (bias_grad < 0)
        if int(negative.sum()) == 1:
            return int(negative.nonzero()[0, 0])
    uploaded = torch.ones_like(weight_grad, dtype=torch.bool) if weight_mask is None else weight_mask
    row_sums = torch.where(uploaded, weight_grad, torch.zeros_like(weight_grad)).sum(dim=1)
    row_sums = torch.where(uploaded.any(dim=1), row_sums, torch.full_like(row_sums, float("inf")))
    best = int(torch.argmin(row_sums))
    return best if row_sums[best] < 0 else None


def present_labels(bias_grad: torch.Tensor, bias_mask: torch.Tensor | None = None) -> list[int]:
    """Classes present in a batch, from the last layer's bias gradient (iDLG's batch extension).

    The mean bias gradient is ``mean(softmax) - share of each class``; a class in the batch
    is negative unless the model is already confident on it. Only uploaded coordinates count.
    """
    uploaded = torch.ones_like(bias_grad, dtype=torch.bool) if bias_mask is None else bias_mask
    return [int(c) for c in torch.nonzero(uploaded & (bias_grad < 0))[:, 0]]


def analytic_fc_input(weight_grad: torch.Tensor, bias_grad: torch.Tensor,
                      weight_mask: torch.Tensor | None = None, bias_mask: torch.Tensor | None = None,
                      min_bias_grad: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover a fully connected layer's input as ``dW_i / db_i`` over the uploaded rows.

    Each row ``i`` whose bias gradient was uploaded and is non-zero gives ``x_j`` for every
    uploaded ``dW_ij``; estimates from several rows are averaged with weights ``|db_i|``
    (rows with larger bias gradients are less hurt by noise and clipping).

    Returns
    -------
    tuple of torch.Tensor
        ``(x, recovered)``: the estimate (0 where nothing was uploaded) and a boolean mask
        of the input coordinates that were recovered.
    """
    weight_mask = torch.ones_like(weight_grad, dtype=torch.bool) if weight_mask is None else weight_mask
    bias_mask = torch.ones_like(bias_grad, dtype=torch.bool) if bias_mask is None else bias_mask
    usable_rows = bias_mask & (bias_grad.abs() > min_bias_grad)
    usable = weight_mask & usable_rows[:, None]
    safe_bias = torch.where(usable_rows, bias_grad, torch.ones_like(bias_grad))
    ratios = weight_grad / safe_bias[:, None]
    weights = torch.where(usable, bias_grad.abs()[:, None].expand_as(weight_grad), torch.zeros_like(weight_grad))
    total_weight = weights.sum(dim=0)
    recovered = total_weight > 0
    estimate = (weights * torch.where(usable, ratios, torch.zeros_like(ratios))).sum(dim=0) / total_weight.clamp_min(1e-30)
    return torch.where(recovered, estimate, torch.zeros_like(estimate)), recovered


def invert_gradients(model: nn.Module, target_gradients: Sequence[torch.Tensor], labels: torch.Tensor,
                     input_shape: Sequence[int], *, masks: Sequence[torch.Tensor] | None = None,
                     iterations: int = 300, lr: float = 0.1, tv_weight: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """Geiping et al.'s inversion restricted to the uploaded coordinates.

    Minimises ``1 - cos(g(x'), g_observed) + tv_weight * TV(x')`` over dummy inputs ``x'``,
    where both gradients are taken only on the coordinates in ``masks``.

    Parameters
    ----------
    model : nn.Module
        The model whose gradient was uploaded, at the weights the site trained from.
    target_gradients : sequence of torch.Tensor
        Observed gradients in ``model.parameters()`` order (zeros where not uploaded).
    labels : torch.Tensor
        The batch's labels (e.g. from :func:`idlg_label`); their count fixes the batch size.
    input_shape : sequence of int
        Per-sample input shape.
    masks : sequence of torch.Tensor, optional
        Uploaded coordinates (default: all).
    iterations, lr, tv_weight, seed
        Adam on the dummy input.

    Returns
    -------
    torch.Tensor
        The reconstructed batch, ``(len(labels), *input_shape)``.
    """
    params = list(model.parameters())
    masks = [torch.ones_like(g, dtype=torch.bool) for g in target_gradients] if masks is None else list(masks)
    if not (len(params) == len(target_gradients) == len(masks)):
        raise ValueError(f"model has {len(params)} parameter tensors; got {len(target_gradients)} gradients and {len(masks)} masks")
    target = torch.cat([g[m] for g, m in zip(target_gradients, masks, strict=True)])
    if target.numel() == 0 or float(target.norm()) == 0:
        raise ValueError("no non-zero uploaded gradient coordinate to invert")
    torch.manual_seed(seed)
    dummy = torch.randn(len(labels), *input_shape).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[iterations // 2, 3 * iterations // 4], gamma=0.1)
    model.eval()
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(dummy), labels.long())
        grads = torch.autograd.grad(loss, params, create_graph=True)
        current = torch.cat([g[m] for g, m in zip(grads, masks, strict=True)])
        objective = 1 - nn.functional.cosine_similarity(current, target, dim=0) + tv_weight * total_variation(dummy)
        objective.backward()
        optimizer.step()
        scheduler.step()
    logger.debug("gradient inversion: final objective %.4f", objective.item())
    return dummy.detach()
