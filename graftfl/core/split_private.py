"""DP-SGD on a split site's own model parts (``privacy=dpsgd`` with ``split``, ``ushaped``, ``semisup``).

The site's modules (the bottom; with ``ushaped`` also the head, with ``semisup`` also the
decoder) are wrapped in Opacus's ``GradSampleModule`` and its optimizer in a ``DPOptimizer``.
The bottom's backward is still ``activations.backward(gradient_from_server)``: Opacus's
hooks compute per-sample gradients from it, the optimizer clips each to ``max_grad_norm``,
adds N(0, σ²C²) noise and averages over the expected batch size. Batches are Poisson
samples at rate q = batch_size / N (each record independently), drawn from the OS CSPRNG
so the server cannot know them from the run seed; an empty draw still takes a noisy step,
counted by the accountant, as in Opacus. Each step goes into the RDP accountant of
:class:`graftfl.core.privacy.PrivateTraining`; the site keeps its history across turns.

What ε covers: the weights of the site's parts (and all it hands on: relayed or averaged
weights, the final model) with respect to one record of this site. It does **not** cover
the per-batch tensors the server receives: the cut activations are a deterministic function
of the raw inputs, and labels go up in the clear with ``split``/``semisup`` (in ``ushaped``
the head's per-example gradients go up). Those are what ``defence.noise_std``,
``defence.nopeek`` and ``defence.label_rr_epsilon`` address. See docs/audit.md ("Defences").
"""

from __future__ import annotations

import secrets

import torch

from graftfl.core.privacy import DpSgdConfig, History, PrivateTraining, secret_generator


def poisson_indices(num_samples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson batch of ``num_samples`` records: each independently with probability ``sample_rate``."""
    return (torch.rand(int(num_samples), generator=generator, dtype=torch.float64) < float(sample_rate)).nonzero().flatten()


def audit_sampling_generator(audit_seed: int, partition: int, turn: int) -> torch.Generator:
    """The Poisson batches' generator of a site's ``turn``-th DP-SGD turn (1-based) in an audited evaluation run.

    Only where the site's operator gave it an audit seed (``graftfl.clients.split_defences``),
    so that the evaluator can tell which records a recorded frame holds. Whoever holds the
    seed can replay the batches, which DP-SGD's amplification by sampling assumes nobody can:
    the reported ε does not hold against the seed's holder.
    """
    return torch.Generator().manual_seed(((int(audit_seed) * 1_000_003 + int(partition)) * 1_000_033 + int(turn)) % 2**63)


def noise_generator(device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` (Opacus draws the noise where the parameters are) seeded from the OS CSPRNG."""
    return torch.Generator(device=torch.device(device)).manual_seed(secrets.randbits(63))


class PrivateRole:
    """DP-SGD on the modules of a split client role for one turn.

    Parameters
    ----------
    role : BottomClient | UShapedClient | SemisupClient
        Its :meth:`modules` are wrapped in place (attributes of the same names) and its
        ``optimizer`` replaced by a ``DPOptimizer`` until :meth:`close`.
    config : DpSgdConfig
        Clipping bound, δ and the noise (multiplier or target ε).
    num_samples : int
        N, the site's training records (the Poisson population).
    batch_size : int
        The expected batch size; q = batch_size / N.
    history : list, optional
        The site's accountant history from earlier turns.
    sampling_generator, noise_generator : torch.Generator, optional
        Sources of the Poisson draws and of the gradient noise; by default seeded from the
        OS CSPRNG (tests pass seeded ones).
    """

    def __init__(self, role, config: DpSgdConfig, num_samples: int, batch_size: int, history: History | None = None,
                 sampling_generator: torch.Generator | None = None, noise_generator: torch.Generator | None = None):
        if num_samples < 1:
            raise ValueError("DP-SGD needs at least one training record at the site")
        self.role, self.num_samples = role, int(num_samples)
        self.sample_rate = min(1.0, int(batch_size) / self.num_samples)
        self.training = PrivateTraining(config, history)
        self._originals, self._optimizer = dict(role.modules()), role.optimizer
        for module in self._originals.values():
            module.train()  # Opacus refuses a module in eval mode
        wrapped, role.optimizer = self.training.attach_parts(self._originals, role.optimizer, self.sample_rate, int(batch_size), noise_generator)
        self.noise_multiplier = float(role.optimizer.noise_multiplier)  # σ: noise std relative to the clipping bound
        for name, module in wrapped.items():
            setattr(role, name, module)
        self.sampling = sampling_generator if sampling_generator is not None else secret_generator()

    def poisson_batch(self) -> torch.Tensor:
        """Indices of one Poisson batch: each record independently with probability q (may be empty)."""
        return poisson_indices(self.num_samples, self.sample_rate, self.sampling)

    def empty_step(self) -> None:
        """An empty Poisson batch: nothing is exchanged, but the optimizer takes its noisy step and the accountant counts it."""
        optimizer = self.role.optimizer
        optimizer.zero_grad(set_to_none=True)
        for parameter in optimizer.params:
            parameter.grad_sample = torch.zeros(0, *parameter.shape, device=parameter.device, dtype=parameter.dtype)
        optimizer.step()

    def close(self) -> None:
        """Unwrap the modules (Opacus hooks removed) and restore the plain optimizer, with its state."""
        for name, module in self._originals.items():
            getattr(self.role, name)._close()
            setattr(self.role, name, module)
        self.role.optimizer = self._optimizer

    @property
    def history(self) -> History:
        """The accountant's history, to keep for the next turn."""
        return self.training.history

    def epsilon(self) -> float:
        """ε spent by this site so far (all its turns) at the configured δ."""
        return self.training.epsilon()
