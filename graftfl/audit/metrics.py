"""Figures every attack reports: image similarity, distance correlation, ROC AUC, TPR at a fixed FPR.

SSIM and PSNR come from scikit-image (a well-kept implementation; its window adapts to
the 8x8 ``digits`` images, which torchmetrics' 11-pixel Gaussian window does not fit).
AUC comes from scikit-learn. Distance correlation (Székely, Rizzo & Bakirov 2007) is
written from its definition in :mod:`graftfl.core.defences`, since NoPeek uses the same quantity as a loss.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import roc_auc_score, roc_curve

# NoPeek (graftfl.core.defences) uses the same quantity as a loss: one definition, in core.
from graftfl.core.defences import distance_correlation_tensor  # noqa: F401  (re-exported: callers import it from here)


def _as_images(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` float64 numpy array (a single image or a flat batch is refused)."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != 4:
        raise ValueError(f"expected images shaped (N, C, H, W), got shape {array.shape}")
    return array.astype(np.float64)


def _data_range(target: np.ndarray, data_range: float | None) -> float:
    # One range for the whole target batch: a per-image range would reward reconstructions
    # of nearly blank images, and the reconstruction's own range must not set the scale.
    if data_range is not None:
        return float(data_range)
    span = float(target.max() - target.min())
    return span if span > 0 else 1.0


def _window(height: int, width: int) -> int:
    side = min(height, width, 7)
    return side if side % 2 else side - 1


def ssim_per_image(reconstruction, target, data_range: float | None = None) -> np.ndarray:
    """Structural similarity of each reconstruction to its target.

    Parameters
    ----------
    reconstruction, target : torch.Tensor or numpy.ndarray
        Images shaped ``(N, C, H, W)`` on the same scale.
    data_range : float, optional
        The value range of the images; by default the range of the whole ``target`` batch.

    Returns
    -------
    numpy.ndarray
        ``N`` SSIM values in [-1, 1].
    """
    rec, tgt = _as_images(reconstruction), _as_images(target)
    if rec.shape != tgt.shape:
        raise ValueError(f"reconstruction shape {rec.shape} differs from target shape {tgt.shape}")
    span = _data_range(tgt, data_range)
    win = _window(tgt.shape[2], tgt.shape[3])
    return np.array(
        [structural_similarity(r, t, data_range=span, channel_axis=0, win_size=win) for r, t in zip(rec, tgt, strict=True)]
    )


def mean_ssim(reconstruction, target, data_range: float | None = None) -> float:
    """Mean of :func:`ssim_per_image`."""
    return float(ssim_per_image(reconstruction, target, data_range).mean())


def mean_psnr(reconstruction, target, data_range: float | None = None) -> float:
    """Mean peak signal-to-noise ratio (dB) over the batch, on the target batch's range."""
    rec, tgt = _as_images(reconstruction), _as_images(target)
    span = _data_range(tgt, data_range)
    values = [peak_signal_noise_ratio(t, r, data_range=span) for r, t in zip(rec, tgt, strict=True)]
    return float(np.mean(np.minimum(values, 100.0)))  # an exact copy has infinite PSNR; cap it for JSON


def random_guess_ssim(aux_images, target, seed: int = 0, data_range: float | None = None) -> float:
    """The SSIM an attacker gets by guessing: a random auxiliary image for each target.

    This is the baseline an attack must beat before its figure means anything.
    """
    aux = _as_images(aux_images)
    picks = np.random.default_rng(seed).integers(0, len(aux), size=len(_as_images(target)))
    return mean_ssim(aux[picks], target, data_range)


def reconstruction_report(reconstruction, target, aux_images, data_range: float | None = None, seed: int = 0) -> dict[str, float]:
    """The figures of one inversion, beside its baseline: ``{"ssim", "psnr", "guess_ssim", "count"}``.

    ``guess_ssim`` is :func:`random_guess_ssim` against the same targets, so a reader of
    ``privacy.json`` sees at once whether the attack beat guessing.
    """
    span = _data_range(_as_images(target), data_range)
    return {
        "ssim": mean_ssim(reconstruction, target, span),
        "psnr": mean_psnr(reconstruction, target, span),
        "guess_ssim": random_guess_ssim(aux_images, target, seed=seed, data_range=span),
        "count": len(_as_images(target)),
    }


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Sample distance correlation between two batches, as a number (see :func:`distance_correlation_tensor`)."""
    with torch.no_grad():
        return float(distance_correlation_tensor(x.detach(), y.detach()))


def roc_auc(is_positive, scores) -> float:
    """ROC AUC of ``scores`` for the binary labels ``is_positive`` (scikit-learn)."""
    labels = np.asarray(is_positive).astype(int)
    if labels.min() == labels.max():
        raise ValueError("ROC AUC needs both positive and negative examples")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def tpr_at_fpr(is_positive, scores, fpr: float = 0.01) -> float:
    """The highest true-positive rate at a false-positive rate of at most ``fpr`` (Carlini et al. 2022)."""
    fprs, tprs, _ = roc_curve(np.asarray(is_positive).astype(int), np.asarray(scores, dtype=np.float64))
    allowed = fprs <= fpr
    return float(tprs[allowed].max()) if allowed.any() else 0.0
