"""Differential privacy: Opacus DP-SGD with a cumulative accountant, and the Laplace mechanism.

Flower's examples/opacus call ``make_private`` afresh every round, so the epsilon
they report is per round. Here the RDP accountant's history — a list of
``(noise_multiplier, sample_rate, steps)`` — is handed in and out as plain JSON,
so a client can keep it in its persistent state and the reported epsilon is the
cumulative one over every round the client has trained.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass

import torch
from torch import nn

History = list[tuple[float, float, int]]


@dataclass
class DpSgdConfig:
    """DP-SGD settings (the ``privacy=dpsgd`` config group).

    Parameters
    ----------
    max_grad_norm : float
        Per-sample gradient clipping bound C.
    delta : float
        Target delta of the (epsilon, delta) guarantee.
    noise_multiplier : float | None
        Gaussian noise standard deviation relative to C. Exactly one of this and
        ``target_epsilon`` is set.
    target_epsilon : float | None
        Epsilon to reach after ``planned_epochs`` epochs; the noise multiplier is
        derived from it once, so every round uses the same noise.
    planned_epochs : float
        Epochs of local training over the whole run (rounds x local epochs).
    """

    max_grad_norm: float
    delta: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    planned_epochs: float = 1.0

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy: set exactly one of noise_multiplier and target_epsilon")
        if self.max_grad_norm <= 0 or not 0 < self.delta < 1:
            raise ValueError("privacy: max_grad_norm must be > 0 and delta in (0, 1)")

    def resolve_noise_multiplier(self, sample_rate: float) -> float:
        """The DP-SGD noise multiplier: the configured one, or the one that reaches the target epsilon at ``sample_rate``."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        from opacus.accountants.utils import get_noise_multiplier

        return float(
            get_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=sample_rate,
                epochs=self.planned_epochs,
                accountant="rdp",
            )
        )


class PrivateTraining:
    """Small facade over Opacus: make one round of local training DP-SGD.

    Use ``attach`` before the round and ``history``/``epsilon`` after it.
    """

    def __init__(self, config: DpSgdConfig, history: History | None = None):
        from opacus import PrivacyEngine

        self.config = config
        self.engine = PrivacyEngine(accountant="rdp")
        self.engine.accountant.history = [tuple(step) for step in (history or [])]

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader):
        """Return ``(private_model, private_optimizer, private_loader)`` (Poisson sampling)."""
        sample_rate = 1.0 / max(len(loader), 1)
        private_model, private_optimizer, private_loader = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.config.resolve_noise_multiplier(sample_rate),
            max_grad_norm=self.config.max_grad_norm,
            poisson_sampling=True,
        )
        # Opacus truncates len(dataset) * (1 / len(loader)): 479 * (1/479) = 0.99999... -> 0 at batch
        # size 1, and the averaged gradient divides by it (NaN weights). Round it instead.
        private_optimizer.expected_batch_size = max(1, round(len(loader.dataset) * sample_rate))
        return private_model, private_optimizer, private_loader

    def attach_parts(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, sample_rate: float,
                     expected_batch_size: int, generator: torch.Generator | None = None):
        """DP-SGD on model parts trained by a gradient from elsewhere (a split site's bottom).

        No data loader: the caller draws Poisson batches at ``sample_rate`` itself. Returns
        ``({name: GradSampleModule}, DPOptimizer)``; each optimizer step is recorded in this
        object's accountant, as :meth:`attach`'s are. ``generator`` draws the Gaussian noise.
        """
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        wrapped = {name: GradSampleModule(module, loss_reduction="mean") for name, module in modules.items()}
        private_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.config.resolve_noise_multiplier(sample_rate),
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=int(expected_batch_size),
            loss_reduction="mean",
            generator=generator,
        )
        private_optimizer.attach_step_hook(self.engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        return wrapped, private_optimizer

    @property
    def history(self) -> History:
        """The accountant's history of (noise multiplier, sample rate, steps), to persist between rounds."""
        return [tuple(step) for step in self.engine.accountant.history]

    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta."""
        return epsilon_of(self.history, self.config.delta)


def epsilon_of(history: History, delta: float) -> float:
    """Cumulative epsilon of an RDP accountant history at ``delta``."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [tuple(step) for step in history]
    return float(accountant.get_epsilon(delta)) if history else 0.0


def history_to_json(history: History) -> str:
    """Serialize an accountant history to JSON (for a ConfigRecord)."""
    return json.dumps([list(step) for step in history])


def history_from_json(text: str | None) -> History:
    """Parse a history written by :func:`history_to_json`; an empty or missing text is an empty history."""
    return [tuple(step) for step in json.loads(text)] if text else []


def dpsgd_config_from(privacy_cfg, planned_epochs: float) -> DpSgdConfig | None:
    """The ``privacy`` config group as a :class:`DpSgdConfig`, or None when DP-SGD is off."""
    if privacy_cfg.name != "dpsgd":
        return None
    return DpSgdConfig(
        max_grad_norm=float(privacy_cfg.max_grad_norm),
        delta=float(privacy_cfg.delta),
        noise_multiplier=privacy_cfg.get("noise_multiplier"),
        target_epsilon=privacy_cfg.get("target_epsilon"),
        planned_epochs=planned_epochs,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus's GradSampleModule (or the module itself)."""
    return getattr(model, "_module", model)


# ------------------------------------------------------- Laplace mechanism ---


def laplace_scale(epsilon: float, sensitivity: float) -> float:
    """Scale b = sensitivity / epsilon of the Laplace mechanism."""
    if epsilon <= 0 or sensitivity <= 0:
        raise ValueError("Laplace mechanism needs epsilon > 0 and sensitivity > 0")
    return sensitivity / epsilon


def laplace_samples(shape, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """I.i.d. Laplace(0, ``scale``) samples (float64, CPU: where ``generator`` lives)."""
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    return -float(scale) * torch.sign(uniform) * torch.log1p(-2 * uniform.abs())


def add_laplace_noise(values: torch.Tensor, epsilon: float, sensitivity: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``values`` plus i.i.d. Laplace(0, sensitivity / epsilon) noise.

    The noise is drawn on the CPU (where ``generator`` lives), so a seed gives the
    same noise whatever device ``values`` are on.
    """
    noise = laplace_samples(values.shape, laplace_scale(epsilon, sensitivity), generator)
    return values + noise.to(values.device, values.dtype)


def secret_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's CSPRNG.

    Privacy noise must not come from the run's seed: the server knows the seed (it
    sends the config) and could regenerate the noise and subtract it.
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


def compose_laplace_epsilon(per_upload_epsilons: list[float]) -> float:
    """Basic sequential composition: epsilons of pure-DP releases add up."""
    return float(math.fsum(per_upload_epsilons))
