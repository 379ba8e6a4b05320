"""The feature-upload protocol's models: the site autoencoder and the server's MLP classifier.

Salehinejad et al. ("Deep Learning from Distributed Images on a Privacy Preserving
Internet of Autoencoders") let every site run a small convolutional autoencoder and
send only latent vectors; a server-side MLP (256-128-64-P) learns the labels from
them. This module builds both, trains them (Adam; MSE for the autoencoder,
cross-entropy for the classifier), computes the paper's reconstruction error δ
(Eq. 9) and draws the original / latent / reconstruction grid (Fig. 3-4).

``conv_ae`` is a :class:`StagedModel` with exactly two stages, ``encoder`` and
``decoder``: calling it reconstructs, ``model.encoder(x)`` gives the latent vector,
and ``cut_model(model, ["encoder"])`` gives ``[encoder, decoder]``. It ignores
``num_classes`` (an autoencoder has no labels). Importing this module registers it
in the model zoo (:func:`graftfl.core.models.register_model`), so
``build_model("conv_ae", shape, 0)`` works.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from graftfl.core.data import make_loader
from graftfl.core.models import StagedModel, mlp, register_model
from graftfl.core.overlap import overlapping
from graftfl.core.train import evaluate, make_optimizer, seed_torch, train
from graftfl.core.weights_file import load_weights_file

CLASSIFIER_HIDDEN = (256, 128, 64)  # the paper's MLP: 256-128-64-P


def conv_ae(input_shape: Sequence[int], num_classes: int = 0, latent_dim: int = 784, channels: int = 16) -> StagedModel:
    """The paper's convolutional autoencoder.

    Encoder: one 5x5 convolution (``channels`` maps, ReLU), 2x2 max-pooling and a
    dense layer to the latent vector (linear, length ``latent_dim``; the paper uses
    784 for MNIST). Decoder, mirrored: dense layer back to the pooled maps (ReLU),
    2x nearest upsampling and a 5x5 convolution to the image channels (linear,
    because inputs are standardised).

    Parameters
    ----------
    input_shape : Sequence[int]
        ``(channels, height, width)`` with even height and width.
    num_classes : int
        Ignored (kept so the model zoo can build every model the same way).
    latent_dim : int
        Length of the latent vector a site uploads.
    channels : int
        Feature maps of the convolution.
    """
    image_channels, height, width = (int(d) for d in input_shape)
    if height % 2 or width % 2:
        raise ValueError(f"conv_ae needs even image sides for 2x2 pooling, got {height}x{width}")
    pooled = (channels, height // 2, width // 2)
    pooled_size = int(np.prod(pooled))
    encoder = nn.Sequential(
        nn.Conv2d(image_channels, channels, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(pooled_size, latent_dim),
    )
    decoder = nn.Sequential(
        nn.Linear(latent_dim, pooled_size),
        nn.ReLU(),
        nn.Unflatten(1, pooled),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(channels, image_channels, 5, padding=2),
    )
    return StagedModel(OrderedDict(encoder=encoder, decoder=decoder))


register_model("conv_ae", conv_ae)


def latent_dim_of(model: StagedModel) -> int:
    """Width of the latent vector the encoder of ``model`` produces."""
    return int(model.encoder[-1].out_features)


# ---------------------------------------------------------------- training ---


def _reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def train_autoencoder(
    model: StagedModel,
    x: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
) -> dict[str, float]:
    """Train ``model`` to reconstruct ``x`` with Adam and MSE (the paper's setting)."""
    seed_torch(seed, device)
    loader = make_loader(x, x, batch_size, shuffle=True, seed=seed)
    optimizer = make_optimizer("adam", model.parameters(), lr)
    with overlapping(model):  # batches from the loader's own generator: another simulated client may run meanwhile
        result = train(model, loader, optimizer, device=device, epochs=epochs, loss_fn=_reconstruction_loss)
    return {"ae_loss": result["loss"], "steps": result["steps"], "samples": result["samples"]}


@torch.no_grad()
def encode(model: StagedModel, x: torch.Tensor, *, batch_size: int = 512, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Latent vectors (float32, on CPU) of ``x``."""
    model.to(device).eval()
    parts = [model.encoder(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, latent_dim_of(model))


@torch.no_grad()
def reconstruct(model: StagedModel, x: torch.Tensor, *, batch_size: int = 512, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Reconstructions of ``x`` by ``model`` (on CPU), computed in batches of ``batch_size``."""
    model.to(device).eval()
    parts = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.empty_like(x)


def reconstruction_error_by_class(model: StagedModel, x: torch.Tensor, y: torch.Tensor, num_classes: int, device=torch.device("cpu")) -> tuple[list[float], list[int]]:
    """Per-class sums of the paper's reconstruction error and the class counts.

    Eq. 9: δ = (1/N) Σ_n (1/D) ||x_n − x̂_n||², the mean over images of the
    per-pixel squared error (on the standardised images the autoencoder sees).
    Sums (not means) are returned so sites can be pooled: δ_c = Σ sums / Σ counts.
    """
    per_image = ((reconstruct(model, x, device=device) - x) ** 2).flatten(1).mean(dim=1)
    sums = [float(per_image[y == c].sum()) for c in range(num_classes)]
    counts = [int((y == c).sum()) for c in range(num_classes)]
    return sums, counts


# -------------------------------------------------------------- classifier ---


def feature_classifier(latent_dim: int, num_classes: int, hidden: Sequence[int] = CLASSIFIER_HIDDEN) -> StagedModel:
    """The paper's MLP on latent vectors: ``latent_dim``-256-128-64-``num_classes``."""
    return mlp((latent_dim,), num_classes, hidden=tuple(int(h) for h in hidden))


def content_order(latents: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows sorted by label, then by the bytes of their vector (only identical rows tie).

    A feature store keys its rows by the client ids the server gives, which follow the node ids
    Flower draws at random per run: in key order, a seeded classifier changed from run to run.
    """
    if latents.ndim != 2 or len(latents) == 0:
        return latents, labels
    vectors = latents.detach().cpu().contiguous().numpy()
    rows = vectors.view(np.dtype((np.void, vectors.shape[1] * vectors.itemsize))).ravel()  # one sortable value per row
    order = torch.from_numpy(np.lexsort((rows, labels.cpu().numpy())))
    return latents[order], labels[order]


def train_classifier(
    latents: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    hidden: Sequence[int] = CLASSIFIER_HIDDEN,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> tuple[StagedModel, dict[str, float]]:
    """A fresh MLP trained on ``(latents, labels)`` with Adam in mini-batches (paper: 64).

    The rows are first put in :func:`content_order`, so the classifier a seed gives does not
    depend on the order they arrived or were stored in.
    """
    latents, labels = content_order(latents, labels)
    seed_torch(seed, device)
    model = feature_classifier(latents.shape[1], num_classes, hidden)
    loader = make_loader(latents, labels, batch_size, shuffle=True, seed=seed)
    result = train(model, loader, make_optimizer("adam", model.parameters(), lr), device=device, epochs=epochs)
    fit = evaluate(model, latents, labels, device=device, num_classes=num_classes)
    model.cpu().eval()
    return model, {"train_loss": result["loss"], "train_accuracy": fit["accuracy"], "steps": result["steps"]}


# ------------------------------------------------------------- persistence ---


def _atomic_save(obj, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def save_autoencoder(path: Path, model: StagedModel, input_shape: Sequence[int], channels: int, normalisation: tuple[list[float], list[float]] | None = None) -> Path:
    """Write the autoencoder with what a site needs to encode new images later.

    ``normalisation`` is the per-channel (mean, std) of the training split on the
    [0, 1] pixel scale, so ``graftfl predict`` standardises images as training did.
    """
    return _atomic_save(
        {
            "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "input_shape": [int(d) for d in input_shape],
            "latent_dim": latent_dim_of(model),
            "channels": int(channels),
            "normalisation": normalisation,
        },
        path,
    )


def load_autoencoder(path: Path) -> tuple[StagedModel, dict]:
    """Load an autoencoder saved by :func:`save_autoencoder`; returns the model (in eval mode) and the stored dict."""
    stored = load_weights_file(path)  # weights only: the file may come from elsewhere
    model = conv_ae(stored["input_shape"], latent_dim=stored["latent_dim"], channels=stored["channels"])
    model.load_state_dict(stored["state"])
    return model.eval(), stored


def save_classifier(path: Path, model: StagedModel, latent_dim: int, num_classes: int, hidden: Sequence[int], version: int = 1) -> Path:
    """Save a feature classifier with the sizes needed to rebuild it; written atomically, returns ``path``."""
    return _atomic_save(
        {"state": model.state_dict(), "latent_dim": int(latent_dim), "num_classes": int(num_classes), "hidden": [int(h) for h in hidden], "version": int(version)},
        path,
    )


def load_classifier(path: Path) -> tuple[StagedModel, dict]:
    """Load a feature classifier saved by :func:`save_classifier`; returns the model (in eval mode) and the stored dict."""
    stored = load_weights_file(path)  # weights only: the file may come from elsewhere
    model = feature_classifier(stored["latent_dim"], stored["num_classes"], stored["hidden"])
    model.load_state_dict(stored["state"])
    return model.eval(), stored


# ------------------------------------------------------------------ figure ---


def _as_square(vector: np.ndarray) -> np.ndarray:
    """A latent vector reshaped to the smallest square (zero-padded), as in Fig. 3-4."""
    side = math.ceil(math.sqrt(len(vector)))
    padded = np.zeros(side * side, dtype=np.float32)
    padded[: len(vector)] = vector
    return padded.reshape(side, side)


def _as_image(image: np.ndarray) -> np.ndarray:
    return image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))


def class_grid_figure(path: Path, model: StagedModel, x: torch.Tensor, y: torch.Tensor, num_classes: int, title: str = "") -> Path | None:
    """One row per class: original | latent (reshaped to a square) | reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [int(torch.nonzero(y == c)[0]) for c in range(num_classes) if (y == c).any()]
    if not picks:
        return None
    originals = x[picks]
    latents, rebuilt = encode(model, originals).numpy(), reconstruct(model, originals).numpy()
    fig, axes = plt.subplots(len(picks), 3, figsize=(4.5, 1.5 * len(picks)), squeeze=False)
    for row, index in enumerate(picks):
        panels = (_as_image(originals[row].numpy()), _as_square(latents[row]), _as_image(rebuilt[row]))
        for col, (panel, name) in enumerate(zip(panels, ("original", "latent", "reconstruction"), strict=True)):
            ax = axes[row][col]
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(f"class {int(y[index])}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
