"""Reconstruct a site's inputs from the cut-layer activations a split server receives.

Three attackers, strongest first:

- :func:`train_query_decoder` — the server can query the trained bottom (it holds its
  weights, or a copy): it trains a decoder on ``(bottom(aux), aux)`` pairs from its
  auxiliary data (He, Zhang & Lee, ACSAC 2019, "model inversion ... in collaborative
  inference", the white-box/query-free tier). An upper bound on what activations reveal.
- :func:`train_shadow_decoder` — no bottom weights: a *shadow* bottom of the same
  architecture, freshly initialised, is trained jointly with a decoder so that the
  decoder reconstructs auxiliary images from the shadow's activations while the
  shadow's activation distribution on auxiliary data matches the distribution of the
  observed activations (sliced Wasserstein distance plus per-feature mean and
  standard deviation).
- :func:`unsplit` — no bottom weights and no training set of activations needed:
  UnSplit (Erdogan, Küpçü & Çiçek, WPES 2022) alternately optimises the unknown
  inputs and a surrogate bottom so that the surrogate maps the inputs to the observed
  activations, with a total-variation prior on the inputs.

Every function takes torch tensors and returns reconstructions on the same scale as the
inputs; :mod:`graftfl.audit.metrics` scores them. Nothing here imports Flower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


def inversion_decoder(act_shape: Sequence[int], input_shape: Sequence[int], width: int = 64) -> nn.Module:
    """A decoder from activations of shape ``act_shape`` back to images of ``input_shape``.

    Image-shaped activations go through two 3x3 convolutions after resizing to the input's
    side; flat activations through a two-layer perceptron. It is deliberately larger than
    the semisup decoder (:func:`graftfl.core.split.build_decoder`): an attack is only worth
    reporting at the strength the attacker can afford.
    """
    act_shape, input_shape = tuple(int(d) for d in act_shape), tuple(int(d) for d in input_shape)
    if len(act_shape) == 3 and len(input_shape) == 3:
        return nn.Sequential(
            nn.Upsample(size=input_shape[1:], mode="bilinear", align_corners=False),
            nn.Conv2d(act_shape[0], width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, input_shape[0], 3, padding=1),
        )
    flat_in = int(torch.tensor(act_shape).prod())
    flat_out = int(torch.tensor(input_shape).prod())
    hidden = max(4 * width, flat_out)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(flat_in, hidden), nn.ReLU(), nn.Linear(hidden, flat_out), nn.Unflatten(1, input_shape)
    )


def _activation_shape(bottom: nn.Module, sample: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(bottom(sample[:1]).shape[1:])


def train_query_decoder(
    bottom: nn.Module,
    aux_x: torch.Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    decoder: nn.Module | None = None,
    activation_noise: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Train a decoder that inverts ``bottom``, using only auxiliary data and queries to ``bottom``.

    Parameters
    ----------
    bottom : nn.Module
        The site's trained bottom (the attacker may only run it forward).
    aux_x : torch.Tensor
        The attacker's auxiliary inputs, disjoint from the sites' data.
    epochs, batch_size, lr : int, int, float
        Adam training of the decoder (MSE on the inputs).
    decoder : nn.Module, optional
        Defaults to :func:`inversion_decoder` for the bottom's activation shape.
    activation_noise : float
        Standard deviation of Gaussian noise the attacker adds to the activations it trains
        on: an adaptive attacker that knows the site noises its activations trains with the
        same noise.
    seed : int
        Seeds the decoder's initialisation and the batch order.

    Returns
    -------
    nn.Module
        The decoder, in eval mode; apply it with :func:`reconstruct`.
    """
    torch.manual_seed(seed)
    bottom.eval()
    decoder = decoder or inversion_decoder(_activation_shape(bottom, aux_x), aux_x.shape[1:])
    with torch.no_grad():
        activations = torch.cat([bottom(aux_x[i : i + 512]) for i in range(0, len(aux_x), 512)])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    decoder.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(aux_x), generator=generator).split(batch_size):
            inputs = activations[batch]
            if activation_noise > 0:
                inputs = inputs + activation_noise * torch.randn(inputs.shape, generator=generator)
            loss = nn.functional.mse_loss(decoder(inputs), aux_x[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    logger.debug("query decoder: final batch MSE %.4f", loss.item())
    return decoder.eval()


@torch.no_grad()
def reconstruct(decoder: nn.Module, activations: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Apply an inversion decoder to observed activations."""
    decoder.eval()
    return torch.cat([decoder(activations[i : i + batch_size]) for i in range(0, len(activations), batch_size)])


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 128, generator: torch.Generator | None = None) -> torch.Tensor:
    """Squared sliced 1-D Wasserstein-2 distance between two samples (rows), differentiable in both.

    The two samples may differ in size: the larger is subsampled to the smaller.
    """
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    count = min(len(a), len(b))
    if len(a) > count:
        a = a[torch.randperm(len(a), generator=generator)[:count]]
    if len(b) > count:
        b = b[torch.randperm(len(b), generator=generator)[:count]]
    directions = torch.randn(a.shape[1], projections, generator=generator)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_a, _ = torch.sort(a @ directions, dim=0)
    projected_b, _ = torch.sort(b @ directions, dim=0)
    return ((projected_a - projected_b) ** 2).mean()


def train_shadow_decoder(
    make_bottom: Callable[[], nn.Module],
    observed_activations: torch.Tensor,
    aux_x: torch.Tensor,
    *,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 1e-3,
    match_weight: float = 1.0,
    seed: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """Train a shadow bottom and a decoder without the site's bottom weights.

    Loss per step: ``MSE(decoder(shadow(aux)), aux) + match_weight * D(shadow(aux), observed)``
    where ``D`` is the sliced Wasserstein distance plus the squared differences of the
    per-feature means and standard deviations. The decoder then reads the observed
    activations as if the shadow had produced them.

    Parameters
    ----------
    make_bottom : callable
        Builds a freshly initialised bottom of the site's architecture (the architecture
        is public in graftfl: it is in the run config).
    observed_activations : torch.Tensor
        Activations the server received (any number of batches, stacked).
    aux_x : torch.Tensor
        The attacker's auxiliary inputs.
    epochs, batch_size, lr, match_weight, seed
        Joint Adam training; ``match_weight`` weighs distribution matching against reconstruction.

    Returns
    -------
    tuple of nn.Module
        ``(shadow_bottom, decoder)``, both in eval mode.
    """
    torch.manual_seed(seed)
    shadow = make_bottom()
    decoder = inversion_decoder(_activation_shape(shadow, aux_x), aux_x.shape[1:])
    observed = observed_activations.detach().reshape(len(observed_activations), -1)
    target_mean, target_std = observed.mean(0), observed.std(0)
    optimizer = torch.optim.Adam([*shadow.parameters(), *decoder.parameters()], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    shadow.train()
    decoder.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(aux_x), generator=generator).split(batch_size):
            if len(batch) < 2:
                continue
            activations = shadow(aux_x[batch])
            flat = activations.reshape(len(batch), -1)
            observed_batch = observed[torch.randint(len(observed), (len(batch),), generator=generator)]
            match = (
                sliced_wasserstein(flat, observed_batch, generator=generator)
                + ((flat.mean(0) - target_mean) ** 2).mean()
                + ((flat.std(0) - target_std) ** 2).mean()
            )
            loss = nn.functional.mse_loss(decoder(activations), aux_x[batch]) + match_weight * match
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    logger.debug("shadow decoder: final batch loss %.4f (match %.4f)", loss.item(), match.item())
    return shadow.eval(), decoder.eval()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (the usual image prior)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def unsplit(
    make_bottom: Callable[[], nn.Module],
    observed_activations: torch.Tensor,
    input_shape: Sequence[int],
    *,
    rounds: int = 50,
    input_steps: int = 20,
    model_steps: int = 20,
    lr: float = 0.05,
    tv_weight: float = 0.0,
    aux_x: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """UnSplit: jointly recover the inputs and a surrogate bottom from observed activations.

    Alternates ``input_steps`` Adam steps on the unknown inputs with ``model_steps`` on
    the surrogate's weights, minimising ``MSE(surrogate(x), observed) + tv_weight * TV(x)``.

    Returns
    -------
    torch.Tensor
        The recovered inputs, shaped ``(len(observed_activations), *input_shape)``.
    """
    torch.manual_seed(seed)
    surrogate = make_bottom().train()
    observed = observed_activations.detach()
    guess = (0.1 * torch.randn(len(observed), *input_shape)).requires_grad_(True)
    input_optimizer = torch.optim.Adam([guess], lr=lr)
    model_optimizer = torch.optim.Adam(surrogate.parameters(), lr=lr)

    def objective() -> torch.Tensor:
        return nn.functional.mse_loss(surrogate(guess), observed) + tv_weight * total_variation(guess)

    for _ in range(rounds):
        for optimizer, steps in ((input_optimizer, input_steps), (model_optimizer, model_steps)):
            for _ in range(steps):
                optimizer.zero_grad()
                loss = objective()
                loss.backward()
                optimizer.step()
    logger.debug("unsplit: final objective %.4f", loss.item())
    return guess.detach() if aux_x is None else calibrate_to_aux(guess.detach(), aux_x, seed=seed)


def calibrate_to_aux(recovered: torch.Tensor, aux_x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Fix the sign and affine scale of recovered inputs from auxiliary data alone.

    Each sign candidate is standardised to the auxiliary pixel mean and standard
    deviation; the candidate whose pixel distribution is closer (sliced Wasserstein)
    to the auxiliary images' is kept. No site data is used.
    """
    generator = torch.Generator().manual_seed(seed)
    mean, std = aux_x.mean(), aux_x.std()
    best, best_distance = recovered, float("inf")
    for sign in (1.0, -1.0):
        candidate = sign * recovered
        candidate = (candidate - candidate.mean()) / candidate.std().clamp_min(1e-8) * std + mean
        distance = float(sliced_wasserstein(candidate, aux_x, generator=generator))
        if distance < best_distance:
            best, best_distance = candidate, distance
    return best


def add_gaussian_noise(activations: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """The defence "Gaussian noise on the cut activations": what the server then observes."""
    generator = torch.Generator().manual_seed(seed)
    return activations + std * torch.randn(activations.shape, generator=generator)
