"""Inputs and identities from the autoencoder latents of ``protocol=features``.

What the server can do depends on who holds the decoder (``autoencoder.training``):

- ``federated`` or ``public`` — the server holds the autoencoder: :func:`decode_latents`
  reconstructs directly.
- the server can query the encoder (e.g. a published encoder): a decoder trained on
  auxiliary data through it, :func:`train_latent_decoder` (the He et al. tier of
  :mod:`graftfl.audit.split_inversion`).
- ``local`` — each site keeps its autoencoder: :func:`surrogate_encoder_attack` trains a
  surrogate encoder of the public architecture on auxiliary data, either jointly with a
  decoder to match the observed latents' distribution (``method="shadow"``) or
  UnSplit-style (``method="unsplit"``), see :mod:`graftfl.audit.split_inversion`.

Re-identification (:func:`reidentification_rate`): the attacker holds other images of a
known patient (a second scan), encodes them, and looks up the nearest uploaded latent; the
figure is the fraction of look-ups that land on that patient's record, next to the rate
of a random look-up (:func:`chance_reidentification_rate`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from graftfl.audit import split_inversion


@torch.no_grad()
def decode_latents(decoder: nn.Module, latents: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Reconstructions of ``latents`` by a decoder the server holds (e.g. ``conv_ae``'s ``decoder`` stage)."""
    return split_inversion.reconstruct(decoder, latents, batch_size)


def train_latent_decoder(encoder: nn.Module, aux_x: torch.Tensor, **kwargs) -> nn.Module:
    """A decoder trained on ``(encoder(aux), aux)``: the attacker with query access to the encoder.

    Keyword arguments go to :func:`graftfl.audit.split_inversion.train_query_decoder`.
    """
    return split_inversion.train_query_decoder(encoder, aux_x, **kwargs)


def surrogate_encoder_attack(make_encoder: Callable[[], nn.Module], observed_latents: torch.Tensor, aux_x: torch.Tensor,
                             *, method: str = "unsplit", **kwargs) -> torch.Tensor:
    """Reconstruct inputs from latents of an encoder the attacker does not hold.

    Parameters
    ----------
    make_encoder : callable
        Builds a fresh encoder of the site's (public) architecture.
    observed_latents : torch.Tensor
        The latents to invert.
    aux_x : torch.Tensor
        Auxiliary inputs.
    method : {"unsplit", "shadow"}
        ``unsplit``: :func:`~graftfl.audit.split_inversion.unsplit` calibrated on ``aux_x``;
        ``shadow``: :func:`~graftfl.audit.split_inversion.train_shadow_decoder`.
    **kwargs
        Passed to the chosen attack.

    Returns
    -------
    torch.Tensor
        Reconstructions, one per latent.
    """
    if method == "unsplit":
        return split_inversion.unsplit(make_encoder, observed_latents, tuple(aux_x.shape[1:]), aux_x=aux_x, **kwargs)
    if method == "shadow":
        _, decoder = split_inversion.train_shadow_decoder(make_encoder, observed_latents, aux_x, **kwargs)
        return split_inversion.reconstruct(decoder, observed_latents)
    raise ValueError(f"unknown method '{method}'; valid methods: ['shadow', 'unsplit']")


def _ids(ids) -> np.ndarray:
    return (ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)).reshape(-1)


def reidentification_rate(query_latents: torch.Tensor, query_ids, store_latents: torch.Tensor, store_ids) -> float:
    """Fraction of a known patient's latents whose nearest stored latent (Euclidean) is that patient's record.

    Parameters
    ----------
    query_latents : torch.Tensor
        Latents the attacker computed from images of known patients, ``(Q, d)``.
    query_ids : array-like
        The patient of each query.
    store_latents : torch.Tensor
        The uploaded latents the server holds, ``(S, d)``.
    store_ids : array-like
        The patient behind each stored latent (known to the audit, not to the server).
    """
    queries = query_latents.detach().reshape(len(query_latents), -1).double()
    store = store_latents.detach().reshape(len(store_latents), -1).double()
    if queries.shape[1] != store.shape[1]:
        raise ValueError(f"query latents have {queries.shape[1]} values, stored latents {store.shape[1]}")
    query_ids, store_ids = _ids(query_ids), _ids(store_ids)
    if len(query_ids) != len(queries) or len(store_ids) != len(store):
        raise ValueError("need one id per query latent and one per stored latent")
    nearest = torch.cdist(queries, store).argmin(dim=1).numpy()
    return float(np.mean(store_ids[nearest] == query_ids))


def chance_reidentification_rate(query_ids, store_ids) -> float:
    """The rate of a random look-up: for each query, the share of stored latents that belong to its patient."""
    query_ids, store_ids = _ids(query_ids), _ids(store_ids)
    return float(np.mean([np.mean(store_ids == patient) for patient in query_ids]))
