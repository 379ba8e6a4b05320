"""Federated normalization statistics: per-channel moments at each site, combined at the server.

A site sends ``(count, sum, sum of squares)`` per channel of its training images, never
pixels; the server adds them up and derives the mean and standard deviation that pooling
every site's images would give. Sums are kept in float64 so that the combined figures match
a pooled computation to float tolerance even for millions of pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


class MomentsError(ValueError):
    """A site's moments are malformed or impossible (the server rejects them)."""


@dataclass(frozen=True)
class ChannelMoments:
    """Per-channel pixel count, sum and sum of squares of one site's images (values in [0, 1])."""

    count: int
    sum: tuple[float, ...]
    sum_sq: tuple[float, ...]

    def as_dict(self) -> dict:
        """Plain values for a message (MetricRecord-friendly: int and lists of float)."""
        return {"count": int(self.count), "sum": list(self.sum), "sum_sq": list(self.sum_sq)}

    @classmethod
    def from_dict(cls, values: dict, channels: int | None = None, source: str = "a site") -> ChannelMoments:
        """Rebuild and validate moments received from ``source`` (see :func:`validate_moments`)."""
        try:
            moments = cls(int(values["count"]), tuple(float(v) for v in values["sum"]), tuple(float(v) for v in values["sum_sq"]))
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise MomentsError(f"{source}: moments need count (int), sum and sum_sq (lists of float): {err}") from err
        validate_moments(moments, channels, source)
        return moments


def channel_moments(x: torch.Tensor) -> ChannelMoments:
    """Moments of images ``x`` (N x C x H x W, values in [0, 1]) per channel, in float64."""
    if x.ndim != 4:
        raise ValueError(f"expected images as N x C x H x W, got shape {tuple(x.shape)}")
    flat = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    return ChannelMoments(
        count=int(flat.shape[1]),
        sum=tuple(flat.sum(dim=1).tolist()),
        sum_sq=tuple(flat.square().sum(dim=1).tolist()),
    )


def validate_moments(moments: ChannelMoments, channels: int | None = None, source: str = "a site") -> None:
    """Reject moments that pixels in [0, 1] cannot produce: the server must not trust a site's figures.

    Checks: a positive count, one value per channel (``channels`` when given), finite values,
    ``0 <= sum <= count``, ``0 <= sum_sq <= count`` and ``sum**2 <= count * sum_sq`` (Cauchy-Schwarz),
    with a small relative slack for float rounding.
    """
    if not 0 < moments.count < 2**62:
        raise MomentsError(f"{source}: pixel count must be a positive integer, got {moments.count}")
    width = len(moments.sum)
    if width == 0 or len(moments.sum_sq) != width or (channels is not None and width != channels):
        raise MomentsError(f"{source}: expected {channels or 'the same number of'} channel values in sum and sum_sq, got {len(moments.sum)} and {len(moments.sum_sq)}")
    slack = 1e-9 * moments.count + 1e-9
    for total, squares in zip(moments.sum, moments.sum_sq, strict=True):
        if not (math.isfinite(total) and math.isfinite(squares)):
            raise MomentsError(f"{source}: moments must be finite, got sum={total}, sum_sq={squares}")
        if not (-slack <= total <= moments.count + slack and -slack <= squares <= moments.count + slack):
            raise MomentsError(f"{source}: with pixels in [0, 1], sum and sum_sq must lie in [0, count={moments.count}], got {total}, {squares}")
        if total * total > moments.count * squares * (1 + 1e-9) + slack:
            raise MomentsError(f"{source}: sum**2 > count * sum_sq is impossible (sum={total}, sum_sq={squares}, count={moments.count})")


def combine_moments(per_site: Iterable[ChannelMoments], min_std: float = 1e-6) -> tuple[list[float], list[float]]:
    """Server side: the pooled per-channel ``(mean, std)`` from every site's moments.

    ``std`` is the unbiased (n - 1) standard deviation over all pixels, as ``torch.std`` on
    the pooled images gives (what ``core.data`` standardizes registry datasets with),
    floored at ``min_std``.
    """
    per_site = list(per_site)
    if not per_site:
        raise MomentsError("no site sent normalization moments")
    channels = len(per_site[0].sum)
    for number, moments in enumerate(per_site):
        validate_moments(moments, channels, f"site moments #{number}")
    count = sum(m.count for m in per_site)
    means, stds = [], []
    for channel in range(channels):
        total = math.fsum(m.sum[channel] for m in per_site)
        squares = math.fsum(m.sum_sq[channel] for m in per_site)
        mean = total / count
        variance = max(squares - total * mean, 0.0) / max(count - 1, 1)
        means.append(mean)
        stds.append(max(math.sqrt(variance), min_std))
    return means, stds


def standardize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel (N x C x H x W)."""
    shape = (1, len(mean), 1, 1)
    return (x - torch.tensor(mean, dtype=x.dtype).view(shape)) / torch.tensor(std, dtype=x.dtype).view(shape)
