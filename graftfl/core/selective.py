"""Distributed selective SGD (Shokri & Shmatikov, CCS 2015): the tensor logic, without Flower.

Everything here works on the *flat* parameter vector of a model
(:func:`graftfl.core.codec.flatten_parameters`):

- which coordinates of a local update Δ a participant uploads
  (``selection=largest``: the θu·|W| largest |Δ|; ``selection=threshold``: a
  random subset of the coordinates with |Δ| > τ, at most θu·|W| of them;
  ``selection=sparse_vector``: the differentially private selection of the paper,
  a noisy threshold (sparse vector technique) with noised, clipped values),
- clipping every uploaded value to [-γ, γ],
- the sparse wire format (indices + float32 values) and its validation on the server,
- which global coordinates a participant downloads (``most_updated``, ``largest``, ``random``),
- the server's per-parameter statistics (how often and how recently each was updated).

The strategy (``graftfl/strategies/dssgd.py``) and the client handler
(``graftfl/clients/dssgd.py``) only move these tensors through Flower messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from graftfl.core.privacy import laplace_samples

SELECTIONS = ("largest", "threshold", "sparse_vector")
DOWNLOADS = ("most_updated", "largest", "random")
INT32_MAX = 2**31 - 1


# --------------------------------------------------------------- budgets ---


def coordinate_budget(theta: float, num_params: int) -> int:
    """How many coordinates a fraction ``theta`` of ``num_params`` allows (at least 1 when theta > 0)."""
    if not 0 <= theta <= 1:
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    if theta == 0:
        return 0
    return max(1, int(math.floor(theta * num_params)))


# ------------------------------------------------------------- selection ---


def select_largest(delta: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the ``count`` coordinates with the largest ``|delta|``."""
    count = min(int(count), delta.numel())
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.topk(delta.abs(), count, sorted=False).indices.sort().values


def select_threshold(delta: torch.Tensor, tau: float, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (ascending) of a random subset of the coordinates with ``|delta| > tau``, at most ``count``."""
    candidates = torch.nonzero(delta.abs() > tau, as_tuple=False).reshape(-1)
    if len(candidates) > count:
        keep = torch.randperm(len(candidates), generator=generator)[: max(int(count), 0)]  # CPU, like generator
        candidates = candidates[keep.to(candidates.device)]
    return candidates.sort().values


def select_upload(delta: torch.Tensor, selection: str, count: int, tau: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dispatch on ``selection`` (``largest`` | ``threshold``; ``sparse_vector`` is :func:`sparse_vector_upload`)."""
    if selection == "largest":
        return select_largest(delta, count)
    if selection == "threshold":
        if tau is None:
            raise ValueError("selection=threshold needs protocol.threshold (tau)")
        return select_threshold(delta, float(tau), count, generator)
    raise ValueError(f"unknown selection '{selection}'; valid: {list(SELECTIONS[:2])} (sparse_vector goes through make_upload)")


# ------------------------------------------------------ clipping & noise ---


def clip_values(values: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Every value clamped to [-gamma, gamma] (unchanged when gamma is None)."""
    return values if gamma is None else values.clamp(-float(gamma), float(gamma))


# Shokri & Shmatikov (CCS 2015) privatise an upload with the sparse vector technique of
# Dwork & Roth (The Algorithmic Foundations of Differential Privacy, 2014, Section 3.6, "NumericSparse"):
# ε1 = 8/9·ε for choosing which coordinates (noisy threshold), ε2 = 2/9·ε for their values, whose
# Laplace noise of scale 2cΔf/ε2 costs ε2/2 = ε/9 over c values: ε1 + ε2/2 = ε per upload.
SELECTION_EPSILON_SHARE = 8.0 / 9.0
VALUE_EPSILON_SHARE = 2.0 / 9.0  # ε2 in Dwork & Roth's notation; the values spend ε2 / 2 = ε / 9


def upload_sensitivity(gamma: float) -> float:
    """Δf = 2γ: one record can move a value clipped to [-γ, γ] anywhere in that range."""
    return 2.0 * float(gamma)


@dataclass(frozen=True)
class SparseVectorScales:
    """Laplace scales of one private upload of at most ``count`` values (see module comment).

    ``threshold`` = 2cΔf/ε1 (fresh after every selected coordinate), ``query`` = 4cΔf/ε1
    (fresh per examined coordinate), ``value`` = 2cΔf/ε2, with Δf = 2γ.
    """

    threshold: float
    query: float
    value: float

    @classmethod
    def of(cls, epsilon: float, gamma: float, count: int) -> SparseVectorScales:
        """The noise scales for a sparse-vector upload of ``count`` values with budget ``epsilon`` and clip ``gamma``."""
        if epsilon <= 0 or gamma <= 0 or count <= 0:
            raise ValueError(f"sparse vector upload needs epsilon > 0, gamma > 0 and count > 0, got {epsilon}, {gamma}, {count}")
        epsilon_1, epsilon_2 = SELECTION_EPSILON_SHARE * epsilon, VALUE_EPSILON_SHARE * epsilon
        sensitivity = upload_sensitivity(gamma)
        return cls(threshold=2 * count * sensitivity / epsilon_1, query=4 * count * sensitivity / epsilon_1, value=2 * count * sensitivity / epsilon_2)


def _first_at_or_above(queries: np.ndarray, threshold: float, start: int) -> int | None:
    """Position of the first ``queries[i] >= threshold`` with ``i >= start`` (a growing window: hits are dense)."""
    window = 64
    while start < len(queries):
        hits = np.flatnonzero(queries[start : start + window] >= threshold)
        if len(hits):
            return start + int(hits[0])
        start += window
        window *= 2
    return None


def sparse_vector_upload(delta: torch.Tensor, *, tau: float, gamma: float, epsilon: float, count: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, SparseVectorScales]:
    """Shokri & Shmatikov's private upload: ``(indices ascending, values, scales)``, ε-DP per upload.

    Coordinates are examined in a random order. Coordinate j is selected when
    ``|bound(Δ_j, γ)| + Lap(query) >= τ + Lap(threshold)``; the threshold noise is drawn
    afresh after every selection, and at most ``count`` coordinates are selected. A selected
    value is released as ``bound(bound(Δ_j, γ) + Lap(value), γ)``. All randomness comes from
    ``generator``: the caller must seed it with a secret (see ``secret_generator``).
    """
    scales = SparseVectorScales.of(epsilon, gamma, count)
    bounded = delta.detach().to("cpu", torch.float64).reshape(-1).clamp(-float(gamma), float(gamma))
    order = torch.randperm(bounded.numel(), generator=generator)
    queries = (bounded[order].abs() + laplace_samples(bounded.numel(), scales.query, generator)).numpy()
    thresholds = (float(tau) + laplace_samples(count, scales.threshold, generator)).numpy()
    chosen, position = [], 0
    for threshold in thresholds:  # one fresh noisy threshold per selected coordinate
        hit = _first_at_or_above(queries, float(threshold), position)
        if hit is None:
            break
        chosen.append(hit)
        position = hit + 1
    indices = order[torch.tensor(chosen, dtype=torch.long)].sort().values
    noisy = bounded[indices] + laplace_samples(len(indices), scales.value, generator)
    return indices, noisy.clamp(-float(gamma), float(gamma)).to(torch.float32), scales


@dataclass
class Upload:
    """A participant's sparse upload: global coordinates and the values to add there."""

    indices: torch.Tensor  # int64, ascending, unique
    values: torch.Tensor  # float32, clipped (and noised with selection=sparse_vector)
    noise_scale: float = 0.0  # Laplace scale of the value noise (0: none)


def make_upload(
    delta: torch.Tensor,
    *,
    theta_upload: float,
    selection: str = "largest",
    threshold: float | None = None,
    clip: float | None = None,
    upload_epsilon: float | None = None,
    generator: torch.Generator | None = None,
) -> Upload:
    """Select and clip (``largest``/``threshold``), or privatise (``sparse_vector``), the coordinates of ``delta`` to upload.

    ``sparse_vector`` needs ``threshold`` (τ), ``clip`` (γ) and ``upload_epsilon`` (ε per
    upload, selection and values together); ε is refused with the other selections, whose
    choice of coordinates is not private. The budget c = θu·|W| fixes the noise scales, so
    they reveal nothing about the data.
    """
    budget = coordinate_budget(theta_upload, delta.numel())
    if selection == "sparse_vector":
        if threshold is None or clip is None or upload_epsilon is None:
            raise ValueError("selection=sparse_vector needs protocol.threshold (tau), protocol.clip (gamma) and protocol.upload_epsilon")
        if budget == 0:
            return Upload(indices=torch.empty(0, dtype=torch.long), values=torch.empty(0, dtype=torch.float32))
        indices, values, scales = sparse_vector_upload(delta, tau=threshold, gamma=clip, epsilon=upload_epsilon, count=budget, generator=generator)
        return Upload(indices=indices, values=values, noise_scale=scales.value)
    if upload_epsilon is not None:
        raise ValueError(f"upload_epsilon needs selection=sparse_vector: with selection={selection} the choice of coordinates "
                         "is made in the clear, so no epsilon bounds what an upload reveals")
    indices = select_upload(delta, selection, budget, threshold, generator)
    values = clip_values(delta[indices].to(torch.float32), clip)
    # An upload is bound for the wire: CPU tensors, whatever device the update was computed on.
    return Upload(indices=indices.to("cpu", torch.long), values=values.to("cpu", torch.float32))


# ------------------------------------------------------ sparse wire format ---


def index_dtype(num_params: int) -> np.dtype:
    """int32 indices when they fit (every zoo model), int64 otherwise."""
    return np.dtype(np.int32) if num_params <= INT32_MAX else np.dtype(np.int64)


def encode_sparse(indices: torch.Tensor | None, values: torch.Tensor, num_params: int) -> dict[str, np.ndarray]:
    """Arrays for the wire: ``values`` (float32) and, unless the vector is complete, ``indices``.

    ``indices=None`` means "all coordinates in order" (a dense download, θd = 1)
    and costs no index bytes.
    """
    arrays = {"values": values.detach().cpu().to(torch.float32).numpy().astype(np.float32, copy=False)}
    if indices is not None:
        arrays["indices"] = indices.detach().cpu().numpy().astype(index_dtype(num_params))
    return arrays


def decode_sparse(arrays: Mapping[str, np.ndarray]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Inverse of :func:`encode_sparse`: ``(indices int64 or None, values)`` as received.

    Values keep their received dtype so that :func:`validate_upload` can reject a
    wrong one; nothing is checked here beyond the presence of ``values``.
    """
    if "values" not in arrays:
        raise ValueError("sparse record carries no 'values'")
    values = torch.from_numpy(np.array(arrays["values"], copy=True))
    indices = None
    if "indices" in arrays:
        raw = np.asarray(arrays["indices"])
        indices = torch.from_numpy(raw.astype(np.int64)) if raw.dtype.kind in "iu" else torch.from_numpy(np.array(raw, copy=True))
    return indices, values


def sparse_nbytes(count: int, num_params: int, with_indices: bool = True) -> int:
    """Payload bytes of a sparse vector with ``count`` entries (float32 values + indices)."""
    return count * 4 + (count * index_dtype(num_params).itemsize if with_indices else 0)


def validate_upload(indices: torch.Tensor | None, values: torch.Tensor, num_params: int, max_count: int, bound: float | None = None) -> str | None:
    """Why an upload must be rejected, or None when it is acceptable.

    Checks: indices present, integer, one per value, in ``[0, num_params)``, unique;
    values float32, finite and, when the run declares γ (``bound``), within [-γ, γ];
    no more than ``max_count`` of them.
    """
    if indices is None:
        return "upload carries no indices"
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        return f"indices must be integers, got {indices.dtype}"
    if values.dtype != torch.float32:
        return f"values must be float32, got {values.dtype}"
    if indices.dim() != 1 or values.dim() != 1 or len(indices) != len(values):
        return f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must be 1-D of equal length"
    if len(indices) > max_count:
        return f"{len(indices)} values exceed the upload budget theta_upload*|W| = {max_count}"
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= num_params):
        return f"index out of range [0, {num_params}): min {int(indices.min())}, max {int(indices.max())}"
    if len(torch.unique(indices)) != len(indices):
        return "duplicate indices"
    if not bool(torch.isfinite(values).all()):
        return "non-finite values (NaN or inf)"
    # γ as float32, like the participant's clamp: an honest value of exactly ±γ passes.
    if bound is not None and len(values) and float(values.abs().max()) > float(np.float32(bound)):
        return f"values outside the declared range [-gamma, gamma] = [-{bound}, {bound}]: max |value| {float(values.abs().max()):.6g}"
    return None


# ------------------------------------------- server statistics & download ---


class ParameterStatistics:
    """Per global parameter: how many uploads touched it and in which round it was last updated.

    Parameters
    ----------
    num_params : int
        Length of the flat global parameter vector.
    """

    def __init__(self, num_params: int):
        self.update_count = torch.zeros(num_params, dtype=torch.long)
        self.last_updated = torch.zeros(num_params, dtype=torch.long)  # 0: never

    def record(self, indices: torch.Tensor, server_round: int) -> None:
        """Count an update to the parameters at ``indices`` in ``server_round``."""
        self.update_count.index_add_(0, indices, torch.ones_like(indices))
        self.last_updated[indices] = int(server_round)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the counters, to checkpoint."""
        return {"update_count": self.update_count.clone(), "last_updated": self.last_updated.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore counters saved by :meth:`state_dict`."""
        self.update_count = state["update_count"].clone()
        self.last_updated = state["last_updated"].clone()


def choose_download(mode: str, theta_download: float, global_params: torch.Tensor, stats: ParameterStatistics, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Global coordinates a participant downloads; None means all of them (θd = 1).

    ``most_updated``: the most often updated (ties: the most recently updated);
    ``largest``: the largest ``|value|``; ``random``: a uniform random subset.
    """
    if mode not in DOWNLOADS:
        raise ValueError(f"unknown download '{mode}'; valid: {list(DOWNLOADS)}")
    num_params = global_params.numel()
    count = coordinate_budget(theta_download, num_params)
    if count >= num_params:
        return None
    if mode == "largest":
        return select_largest(global_params, count)
    if mode == "random":
        return torch.randperm(num_params, generator=generator)[:count].sort().values
    # rank by (count, recency): recency < rounds+1 always, so a scaled sum orders lexicographically
    score = stats.update_count.double() * (int(stats.last_updated.max()) + 1) + stats.last_updated.double()
    return select_largest(score, count)


def apply_upload(global_params: torch.Tensor, upload_indices: torch.Tensor, upload_values: torch.Tensor) -> None:
    """Add an (already validated) upload to the global vector in place."""
    global_params.index_add_(0, upload_indices, upload_values.to(global_params.dtype))


def overwrite(local_params: torch.Tensor, indices: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """``local_params`` with the downloaded ``values`` written at ``indices`` (all when None)."""
    if indices is None:
        if values.numel() != local_params.numel():
            raise ValueError(f"dense download has {values.numel()} values, the model {local_params.numel()}")
        return values.to(local_params.dtype).clone()
    result = local_params.clone()
    result[indices] = values.to(local_params.dtype)
    return result
