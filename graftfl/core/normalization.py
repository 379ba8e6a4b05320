"""Standardization of a registry dataset's images: raw uint8 rows -> [0, 1] floats -> ``(x - mean) / std``.

The statistics never come from rows a site does not hold. ``dataset.normalization`` picks
their source, as for site data (``dataset=site``):

- ``fixed``: per-dataset constants, ``dataset.mean`` / ``dataset.std`` in ``conf/dataset/<name>.yaml``
  (the published figures; :data:`PUBLISHED` holds the same numbers for code that has no config,
  e.g. :func:`graftfl.core.data.load_dataset`, and a test keeps the two equal);
- ``federated``: the ``normalize`` phase (:mod:`graftfl.core.site_stats`): every site sends the
  count, sum and sum of squares of its own training rows, the server combines them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from graftfl.core.site_stats import standardize

Statistics = tuple[list[float], list[float]]

# Per-channel (mean, std) of each registry dataset's training split on the [0, 1] scale.
PUBLISHED: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "digits": ((0.3041,), (0.3758,)),
    "medmnist": ((0.5,), (0.5,)),  # MedMNIST's own examples' Normalize(mean=[.5], std=[.5]); one value: every channel
}


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N x C x H x W) as float32 on the [0, 1] scale (a new tensor; the input is not touched)."""
    if isinstance(images, torch.Tensor):
        return images.to(torch.float32).div(255.0)
    return torch.from_numpy(np.asarray(images).astype(np.float32)).div_(255.0)  # astype copies: the cache stays read-only


def checked_statistics(mean: Sequence[float], std: Sequence[float], channels: int, source: str = "dataset") -> Statistics:
    """``(mean, std)`` with one value per channel: a single value applies to every channel.

    Raises ``ValueError`` naming ``source`` when the counts do not fit ``channels``, a value is
    not finite, or a std is not positive.
    """
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    for key, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ValueError(f"{source}.{key} needs one value or one per channel ({channels}), got {values}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{source}.{key} values must be finite, got {values}")
    if min(std) <= 0:
        raise ValueError(f"{source}.std values must be > 0, got {std}")
    widen = lambda values: values * channels if len(values) == 1 else values  # noqa: E731
    return widen(mean), widen(std)


def fixed_statistics(data_cfg: Mapping, channels: int) -> Statistics | None:
    """``dataset.normalization=fixed``: ``dataset.mean`` / ``dataset.std``, checked against ``channels``.

    Both ``null``: None (images stay on the [0, 1] scale). A config without the keys (one built
    by hand, not composed from ``conf/``) gets the dataset's :data:`PUBLISHED` figures.
    """
    if "mean" not in data_cfg and "std" not in data_cfg:
        name = str(data_cfg.get("name"))
        if name not in PUBLISHED:
            return None
        mean, std = PUBLISHED[name]
        return checked_statistics(mean, std, channels, f"published statistics of '{name}'")
    mean, std = data_cfg.get("mean"), data_cfg.get("std")
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError("dataset.normalization=fixed needs both dataset.mean and dataset.std (or neither: images stay in [0, 1])")
    return checked_statistics(mean, std, channels)


def standardized(images: np.ndarray | torch.Tensor, statistics: Statistics | None) -> torch.Tensor:
    """uint8 images -> float32 standardized with ``statistics`` (None: the [0, 1] scale)."""
    unit = to_unit(images)
    return standardize(unit, *statistics) if statistics is not None else unit
