"""Defences a site applies before anything leaves it (issue 14): NoPeek, Gaussian noise, label RR.

The ``defence`` config block (all off by default, and then a run computes exactly what it
computed before the defences existed):

- ``defence.nopeek`` (α): the site adds α·dCor(inputs, cut activations) to its loss
  (Vepakomma et al., "NoPeek", 2020), so the bottom learns activations that say less
  about the raw inputs. Split protocols (``split``, ``ushaped``, ``semisup``).
- ``defence.noise_std``: Gaussian noise of this standard deviation (in the units of the
  released tensor) is added at the site to the cut activations (split protocols, training
  and evaluation frames) or to the autoencoder latents (``features``) before they leave.
- ``defence.label_rr_epsilon``: k-ary randomized response on each label sent to the
  server (``split``, ``semisup``): the true label is kept with probability
  e^ε / (e^ε + k − 1), otherwise one of the other k − 1 classes is sent uniformly.
  Each label is then ε-label-DP (Ghazi et al. 2021).

Noise and flips are drawn from the operating system's CSPRNG
(:func:`graftfl.core.privacy.secret_generator`), not from the run seed: the server chooses
and knows the seed and could replay seeded noise and undo it. Tests pass their own generator.

The distance correlation here is the one :mod:`graftfl.audit.metrics` reports, written once
in ``core`` (the audit library sits above ``core`` and imports it from here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graftfl.core.privacy import secret_generator

SPLIT_PROTOCOLS = ("split", "ushaped", "semisup")
# The protocols each defence key applies to (config.py refuses it anywhere else).
DEFENCE_PROTOCOLS: dict[str, tuple[str, ...]] = {
    "nopeek": SPLIT_PROTOCOLS,
    "noise_std": (*SPLIT_PROTOCOLS, "features"),
    "label_rr_epsilon": ("split", "semisup"),  # in ushaped the labels never leave the site
}


@dataclass(frozen=True)
class DefenceConfig:
    """The ``defence`` config block.

    Parameters
    ----------
    nopeek : float
        Weight α of the distance-correlation loss term; 0 turns it off.
    noise_std : float
        Standard deviation of the Gaussian noise on released activations or latents; 0 turns it off.
    label_rr_epsilon : float or None
        ε of k-ary randomized response on the labels sent to the server; None turns it off.
    """

    nopeek: float = 0.0
    noise_std: float = 0.0
    label_rr_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.nopeek) and self.nopeek >= 0):
            raise ValueError(f"defence.nopeek must be a finite number >= 0, got {self.nopeek}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"defence.noise_std must be a finite number >= 0, got {self.noise_std}")
        if self.label_rr_epsilon is not None and not (math.isfinite(self.label_rr_epsilon) and self.label_rr_epsilon > 0):
            raise ValueError(f"defence.label_rr_epsilon must be a finite number > 0 or null, got {self.label_rr_epsilon}")

    @classmethod
    def from_config(cls, cfg) -> "DefenceConfig":
        """The run config's ``defence`` block (missing block or keys: off)."""
        block = cfg.get("defence") or {}
        epsilon = block.get("label_rr_epsilon")
        return cls(
            nopeek=float(block.get("nopeek") or 0.0),
            noise_std=float(block.get("noise_std") or 0.0),
            label_rr_epsilon=None if epsilon is None else float(epsilon),
        )

    def enabled(self) -> list[str]:
        """The names of the keys that are on (``nopeek``, ``noise_std``, ``label_rr_epsilon``)."""
        on = {"nopeek": self.nopeek > 0, "noise_std": self.noise_std > 0, "label_rr_epsilon": self.label_rr_epsilon is not None}
        return [name for name, value in on.items() if value]


# ------------------------------------------------------ distance correlation ---


def _double_centred(rows: torch.Tensor) -> torch.Tensor:
    distances = torch.cdist(rows, rows)
    return distances - distances.mean(0, keepdim=True) - distances.mean(1, keepdim=True) + distances.mean()


def distance_correlation_tensor(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation as a differentiable tensor (each row one sample).

    dCor(X, Y) = sqrt(dCov²(X, Y) / sqrt(dCov²(X, X) dCov²(Y, Y))), with dCov² from the
    double-centred pairwise Euclidean distance matrices (Székely et al. 2007). 0 means
    independent (in the population limit), 1 means one is a similarity transform of the
    other. Differentiable, so NoPeek can use it as a loss term.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples, y has {len(y)}")
    a = _double_centred(x.reshape(len(x), -1).double())
    b = _double_centred(y.reshape(len(y), -1).double())
    dcov_xy = (a * b).mean().clamp_min(0)
    denominator = torch.sqrt((a * a).mean() * (b * b).mean())
    if float(denominator.detach()) <= 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    # eps keeps the gradient of sqrt finite when dCov is exactly 0
    return torch.sqrt(dcov_xy / denominator + 1e-12)


# ------------------------------------------------------------- mechanisms ---


def gaussian_noise(values: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``values`` plus i.i.d. N(0, std²) noise drawn on the CPU (where ``generator`` lives)."""
    noise = torch.randn(values.shape, generator=generator, dtype=torch.float32) * float(std)
    return values + noise.to(values.device, values.dtype)


def rr_keep_probability(epsilon: float, num_classes: int) -> float:
    """Probability that k-ary randomized response keeps the true label: e^ε / (e^ε + k − 1)."""
    return math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)


def randomized_response(labels: torch.Tensor, epsilon: float, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """k-ary randomized response: each label kept with :func:`rr_keep_probability`, else a uniform other class."""
    labels = labels.cpu()
    keep = torch.rand(labels.shape, generator=generator, dtype=torch.float64) < rr_keep_probability(epsilon, num_classes)
    # label + 1..k-1 (mod k) is uniform over the other classes
    shift = torch.randint(1, max(num_classes, 2), labels.shape, generator=generator)
    return torch.where(keep, labels, (labels + shift) % num_classes)


class SiteDefences:
    """What a split client applies to the tensors it releases and to its loss.

    With every key off (``DefenceConfig()``) each method returns exactly what the
    undefended role computed: the detached activations on the CPU, the labels, no loss term.

    Parameters
    ----------
    config : DefenceConfig
        The ``defence`` block.
    num_classes : int
        k of randomized response.
    generator : torch.Generator, optional
        CPU generator of the noise and the flips; by default one seeded from the OS CSPRNG
        (drawn only when a noisy key is on, so the default path touches no random state).
    """

    def __init__(self, config: DefenceConfig | None = None, num_classes: int = 2, generator: torch.Generator | None = None):
        self.config, self.num_classes = config or DefenceConfig(), int(num_classes)
        noisy = self.config.noise_std > 0 or self.config.label_rr_epsilon is not None
        self.generator = generator if generator is not None or not noisy else secret_generator()

    def activations_out(self, activations: torch.Tensor) -> torch.Tensor:
        """The cut activations as they leave the site: detached, on the CPU, plus noise when ``noise_std`` > 0."""
        released = activations.detach().cpu()
        return gaussian_noise(released, self.config.noise_std, self.generator) if self.config.noise_std > 0 else released

    def labels_out(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels as they leave the site: randomized response when ``label_rr_epsilon`` is set."""
        if self.config.label_rr_epsilon is None:
            return labels
        return randomized_response(labels, self.config.label_rr_epsilon, self.num_classes, self.generator)

    def loss_term(self, inputs: torch.Tensor, activations: torch.Tensor) -> torch.Tensor | None:
        """α·dCor(inputs, activations) for NoPeek, or None when it is off (or the batch has one row)."""
        if self.config.nopeek <= 0 or len(inputs) < 2:
            return None
        return self.config.nopeek * distance_correlation_tensor(inputs, activations).to(activations.dtype)


def backward_with(activations: torch.Tensor, gradient: torch.Tensor, extra: torch.Tensor | None) -> None:
    """Backpropagate the server's ``gradient`` at ``activations``, plus the gradient of a local loss term."""
    if extra is None or not extra.requires_grad:
        activations.backward(gradient)
    else:
        torch.autograd.backward([activations, extra], [gradient, None])
