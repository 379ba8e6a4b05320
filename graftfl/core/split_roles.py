"""Client roles of split learning: the site's side of one batch for ``split``, ``ushaped`` and ``semisup``.

Each role runs one batch given an ``exchange(kind, tensors) -> (tensors, meta)`` callable that
reaches the server stage (:mod:`graftfl.core.split`) over the data plane, or directly in tests.
Like :mod:`graftfl.core.split`, this module knows neither the transport nor Flower; the names are
also importable from :mod:`graftfl.core.split`.

Every role releases its cut activations (and labels) through ``role.defences``
(:class:`graftfl.core.defences.SiteDefences`: noise, label randomized response, the NoPeek loss
term); with the defences off that is exactly the undefended computation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from graftfl.core.defences import SiteDefences, backward_with

Exchange = Callable[[str, dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict]]


def training_mode(*modules: nn.Module) -> None:
    """``module.train()`` for each of ``modules``, skipped where every submodule already trains.

    ``train()`` sets the flag on every submodule through ``nn.Module.__setattr__`` (about 30 µs a
    step for LeNet's top half; reading the flags takes a quarter of that), and a split step runs it
    on both sides of the cut. Either way every submodule trains afterwards.
    """
    for module in modules:
        if not all(m.training for m in module.modules()):
            module.train()


def score_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Aggregate evaluation counts of one batch: ``loss_sum``, ``correct``, ``count``."""
    return {"loss_sum": float(F.cross_entropy(logits.float(), labels, reduction="sum")), "correct": int((logits.argmax(1) == labels).sum()), "count": len(labels)}


class BottomClient:
    """Client side of ``split``: holds the bottom, sends activations and labels.

    Parameters
    ----------
    bottom : nn.Module
        The client's layers up to the cut.
    optimizer : torch.optim.Optimizer, optional
        Over the parameters of :meth:`modules` (its state travels with the
        weights); may be set after construction.
    defences : SiteDefences, optional
        What the site applies before tensors leave it; default: none.
    """

    def __init__(self, bottom: nn.Module, optimizer: torch.optim.Optimizer | None = None, device: torch.device | str = "cpu",
                 defences: SiteDefences | None = None):
        self.bottom, self.optimizer, self.device = bottom.to(device), optimizer, torch.device(device)
        self.defences = defences or SiteDefences()

    def modules(self) -> dict[str, nn.Module]:
        """The modules this client trains and whose weights travel between turns."""
        return {"bottom": self.bottom}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, exchange: Exchange) -> float:
        """One training step: send activations and labels, backpropagate the returned gradient; returns the loss."""
        training_mode(self.bottom)
        self.optimizer.zero_grad(set_to_none=True)
        x = x.to(self.device)
        activations = self.bottom(x)
        reply, meta = exchange("train", {"activations": self.defences.activations_out(activations), "labels": self.defences.labels_out(y)})
        backward_with(activations, reply["gradient"].to(self.device, activations.dtype), self.defences.loss_term(x, activations))
        self.optimizer.step()
        return float(meta.get("loss", float("nan")))

    @torch.no_grad()
    def eval_batch(self, x: torch.Tensor, y: torch.Tensor, exchange: Exchange) -> dict:
        """Score one batch: activations go up, logits come back, labels and the counts stay here."""
        self.bottom.eval()
        reply, _ = exchange("eval_forward", {"activations": self.defences.activations_out(self.bottom(x.to(self.device)))})
        return score_logits(reply["logits"].to(self.device), y.to(self.device))


class UShapedClient:
    """Client side of ``ushaped``: bottom and head (+ loss); labels never leave.

    One training batch is two exchanges: ``forward`` (bottom activations ->
    middle outputs) and ``backward`` (gradient of the middle outputs -> gradient
    of the bottom activations).
    """

    def __init__(self, bottom: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer | None = None, device: torch.device | str = "cpu",
                 defences: SiteDefences | None = None):
        self.bottom, self.head, self.optimizer, self.device = bottom.to(device), head.to(device), optimizer, torch.device(device)
        self.defences = defences or SiteDefences()

    def modules(self) -> dict[str, nn.Module]:
        """The modules this client trains and whose weights travel between turns."""
        return {"bottom": self.bottom, "head": self.head}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, exchange: Exchange) -> float:
        """One U-shaped step: bottom forward, middle on the server, head and loss here, gradients back; returns the loss."""
        training_mode(self.bottom, self.head)
        self.optimizer.zero_grad(set_to_none=True)
        x = x.to(self.device)
        activations = self.bottom(x)
        reply, _ = exchange("forward", {"activations": self.defences.activations_out(activations)})
        middle_out = reply["outputs"].to(self.device).requires_grad_(True)
        loss = F.cross_entropy(self.head(middle_out), y.to(self.device))
        loss.backward()
        reply, _ = exchange("backward", {"gradient": middle_out.grad.detach().cpu()})
        backward_with(activations, reply["gradient"].to(self.device, activations.dtype), self.defences.loss_term(x, activations))
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def eval_batch(self, x: torch.Tensor, y: torch.Tensor, exchange: Exchange) -> dict:
        """Score one batch: bottom here, middle on the server, head and labels here."""
        self.bottom.eval()
        self.head.eval()
        reply, _ = exchange("eval_forward", {"activations": self.defences.activations_out(self.bottom(x.to(self.device)))})
        return score_logits(self.head(reply["outputs"].to(self.device)), y.to(self.device))


class SemisupClient(BottomClient):
    """Client side of ``semisup`` (Alg. 3): bottom + decoder.

    The bottom's gradient is the server's gradient (labeled rows only) plus
    ``alpha`` times the gradient of the reconstruction loss (all rows). Labels
    of unlabeled rows are never sent; a batch without labeled rows makes no
    exchange at all.
    """

    def __init__(self, bottom: nn.Module, decoder: nn.Module, optimizer: torch.optim.Optimizer | None = None, alpha: float = 1.0,
                 device: torch.device | str = "cpu", defences: SiteDefences | None = None):
        super().__init__(bottom, optimizer, device, defences)
        self.decoder, self.alpha = decoder.to(device), float(alpha)

    def modules(self) -> dict[str, nn.Module]:
        """The modules this client trains and whose weights travel between turns."""
        return {"bottom": self.bottom, "decoder": self.decoder}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, exchange: Exchange, labeled: torch.Tensor | None = None) -> float:
        """One semi-supervised step: the split loss on ``labeled`` rows plus ``alpha`` times the decoder reconstruction loss.

        Returns the server's loss on the labeled rows (NaN when the batch has none).
        """
        labeled = torch.ones(len(y), dtype=torch.bool) if labeled is None else labeled.bool()
        training_mode(self.bottom, self.decoder)
        self.optimizer.zero_grad(set_to_none=True)
        x = x.to(self.device)
        activations = self.bottom(x)
        reconstruction_loss = F.mse_loss(self.decoder(activations), x)
        surrogate = self.alpha * reconstruction_loss
        nopeek = self.defences.loss_term(x, activations)
        if nopeek is not None:
            surrogate = surrogate + nopeek
        loss = float("nan")
        if labeled.any():
            released = {"activations": self.defences.activations_out(activations[labeled]), "labels": self.defences.labels_out(y[labeled])}
            reply, meta = exchange("train", released)
            # sum(a * g) has gradient g with respect to a: the server's gradient on labeled rows.
            surrogate = surrogate + (activations[labeled] * reply["gradient"].to(self.device, activations.dtype)).sum()
            loss = float(meta.get("loss", loss))
        surrogate.backward()
        self.optimizer.step()
        return loss


def hidden_label_mask(num_samples: int, unlabeled_fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask of the samples whose labels are hidden (semi-supervised setting)."""
    hidden = torch.zeros(num_samples, dtype=torch.bool)
    count = int(round(num_samples * float(unlabeled_fraction)))
    hidden[torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))[:count]] = True
    return hidden
