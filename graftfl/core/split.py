"""Pure-torch pieces of split learning shared by ``split``, ``ushaped`` and ``semisup``.

Server stages (:class:`TopStage`, :class:`MiddleStage`; :class:`ServerStage`) turn the tensors of one
incoming data-plane frame into the tensors of the reply; client roles
(:class:`BottomClient`, :class:`UShapedClient`, :class:`SemisupClient`, in
:mod:`graftfl.core.split_roles` and importable from here) run one
batch given an ``exchange(kind, tensors) -> (tensors, meta)`` callable. The
transport (gRPC) lives elsewhere; this module knows neither it nor Flower, so the
same code runs over the data plane, in one process and in the equivalence tests.

Why the split computation equals centralized training (Gupta & Raskar, Lemma 1):
the client's bottom output ``a`` is the same tensor the whole model would
compute; the server returns ``dL/da``; ``a.backward(dL/da)`` then gives the
bottom exactly the gradients of the whole model. Each part steps its own
optimizer over its own parameters, which for SGD/Adam (per-parameter state) is
the same as one optimizer over all parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from graftfl.core.models import StagedModel, cut_model

# The client roles live in split_roles.py; importable from here as before.
from graftfl.core.split_roles import BottomClient, Exchange, SemisupClient, UShapedClient, hidden_label_mask, score_logits  # noqa: F401
from graftfl.core.split_roles import training_mode


@dataclass(frozen=True)
class TensorSpec:
    """What an incoming tensor must look like.

    ``shape`` gives the per-sample shape (the batch dimension is checked
    separately) or, with ``exact``, the whole shape. ``num_classes`` marks an
    integer label tensor whose values must lie in ``[0, num_classes)``.
    """

    shape: tuple[int, ...]
    floating: bool = True
    num_classes: int | None = None
    exact: bool = False


# ------------------------------------------------------------------ cutting ---


def cut_points(model: StagedModel, cut_stage: str | None, head_stages: int | None = None) -> list[str]:
    """Stage names after which to cut: ``[cut]`` for split, ``[cut, last middle]`` with ``head_stages``.

    ``cut_stage`` null means the first stage with parameters (``conv1`` for LeNet, ``fc1`` for the
    MLP, whose first stage only flattens). A cut that leaves the site's bottom without parameters
    is refused: the site would have nothing to train (its optimizer would fail at the first turn).
    ``head_stages`` is how many final stages the client keeps (U-shaped).
    """
    names = model.stage_names
    trainable = [name for name in names if next(model.get_submodule(name).parameters(), None) is not None]
    cut = cut_stage or (trainable[0] if trainable else names[0])
    if cut not in names:
        raise ValueError(f"unknown cut stage '{cut}'; stages of {type(model).__name__}: {names}")
    if trainable and names.index(cut) < names.index(trainable[0]):
        raise ValueError(f"cut stage '{cut}' leaves the site's bottom without parameters; cut at '{trainable[0]}' or later (stages: {names})")
    if head_stages is None:
        return [cut]
    middle_end = len(names) - 1 - int(head_stages)
    if head_stages < 1 or middle_end <= names.index(cut):
        raise ValueError(f"head_stages={head_stages} leaves no middle after cut stage '{cut}' (stages: {names})")
    return [cut, names[middle_end]]


def activation_shape(bottom: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Per-sample shape of the bottom's output."""
    was_training = bottom.training
    bottom.eval()
    parameter = next(bottom.parameters(), None)
    device = parameter.device if parameter is not None else None  # a bottom already on a GPU is probed there
    with torch.no_grad():
        shape = tuple(bottom(torch.zeros(1, *input_shape, device=device)).shape[1:])
    bottom.train(was_training)
    return shape


def build_decoder(act_shape: Sequence[int], input_shape: Sequence[int]) -> nn.Module:
    """A small decoder from cut activations back to the input (semi-supervised split, Alg. 3).

    Image-shaped activations are upsampled and mapped back with one 3x3 conv;
    flat activations with one linear layer.
    """
    if len(act_shape) == 3 and len(input_shape) == 3:
        return nn.Sequential(nn.Upsample(size=tuple(input_shape[1:]), mode="nearest"), nn.Conv2d(act_shape[0], input_shape[0], 3, padding=1))
    flat_in, flat_out = int(torch.tensor(act_shape).prod()), int(torch.tensor(input_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(flat_in, flat_out), nn.Unflatten(1, tuple(input_shape)))


def test_selection(num_rows: int, size: int | None, seed: int) -> torch.Tensor | None:
    """Rows of the server's test selection: ``size`` of ``num_rows`` drawn with ``seed`` (None: all rows).

    The one draw the server (``ServerRun.test_set``) and every site that scores on that selection use.
    """
    if not size:
        return None
    return torch.randperm(int(num_rows), generator=torch.Generator().manual_seed(int(seed)))[: int(size)]


def test_subset(x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server test set selection of ``(x, y)`` (:func:`test_selection`)."""
    order = test_selection(len(y), size, seed)
    return (x, y) if order is None else (x[order], y[order])


# ------------------------------------------------------------ server stages ---


class _PendingStep:
    """A server stage's parameter update, split from the gradient the client waits for.

    :meth:`start` back-propagates only to the incoming activations (autograd
    skips the parameters' gradient kernels) and keeps the graph;
    :meth:`complete` back-propagates to the parameters and steps the optimizer.
    The two passes give the same gradients as one ``backward()``.
    """

    def __init__(self):
        self._update: tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]] | None = None

    def start(self, outputs: torch.Tensor, activations: torch.Tensor, parameters: list[torch.Tensor], output_gradient: torch.Tensor | None = None) -> torch.Tensor:
        (gradient,) = torch.autograd.grad(outputs, activations, output_gradient, retain_graph=True)
        self._update = (outputs, output_gradient, parameters)
        return gradient.detach()

    def complete(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the started update; ``False`` when none is pending."""
        if self._update is None:
            return False
        outputs, output_gradient, parameters = self._update
        self._update = None
        optimizer.zero_grad(set_to_none=True)
        outputs.backward(output_gradient, inputs=parameters)
        optimizer.step()
        return True


class ServerStage:
    """A server model part: ``module`` (moved to ``device``), its ``optimizer`` and the deferred update."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu"):
        self.module, self.optimizer, self.device = module.to(device), optimizer, torch.device(device)
        self.steps = 0  # completed optimizer steps
        self._pending = _PendingStep()

    def complete_step(self) -> None:
        """Apply the parameter update of the last training frame (``train`` / ``backward``), if not yet done."""
        if self._pending.complete(self.optimizer):
            self.steps += 1

    def _activations_gradient(self, outputs: torch.Tensor, activations: torch.Tensor, output_gradient: torch.Tensor | None, defer_update: bool) -> torch.Tensor:
        """The gradient of ``activations`` (a leaf); the module's update is left pending or, without ``defer_update``, done now.

        Deferred, the update can overlap the client's backward pass (a client in another thread
        or process); done now, it shares one backward pass with the gradient, which saves an
        autograd run when the client waits in the same thread (about 0.3 ms a LeNet step of
        batch 10). The two give the same gradients, and the same weights.
        """
        # the optimizer's parameters: what it steps, without walking the module (~12 µs a LeNet step)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if defer_update:
            return self._pending.start(outputs, activations, parameters, output_gradient)
        self.optimizer.zero_grad(set_to_none=True)
        outputs.backward(output_gradient, inputs=[activations, *parameters])
        self.optimizer.step()
        self.steps += 1
        return activations.grad.detach()


class TopStage(ServerStage):
    """Server side of ``split``/``semisup``: the top of the model and the loss.

    Frames: ``train`` (activations, labels) -> ``gradient`` (gradient of the
    activations); ``eval_forward`` (activations only) -> ``logits``, which the
    client scores against labels that stay with it.

    The client waits only for the gradient of its activations, so ``train``
    computes that alone and leaves the top's own parameter gradients and
    optimizer step pending (:meth:`complete_step`): the data plane completes
    it after the reply has left, while the client runs its backward pass.
    Every ``handle`` completes a pending step first, so the order of updates,
    and the weights, are those of one step per batch.
    """

    def __init__(self, top: nn.Module, optimizer: torch.optim.Optimizer, act_shape: Sequence[int], num_classes: int, device: torch.device | str = "cpu"):
        super().__init__(top, optimizer, device)
        self.top = self.module
        self.act_shape, self.num_classes = tuple(act_shape), int(num_classes)

    def input_specs(self, kind: str, state: dict) -> dict[str, TensorSpec] | None:
        """The tensors a frame of ``kind`` must carry, or None when ``kind`` is not accepted."""
        if kind == "train":
            return {"activations": TensorSpec(self.act_shape), "labels": TensorSpec((), floating=False, num_classes=self.num_classes)}
        if kind == "eval_forward":
            return {"activations": TensorSpec(self.act_shape)}
        return None

    def handle(self, kind: str, tensors: dict[str, torch.Tensor], state: dict, defer_update: bool = True) -> tuple[str, dict[str, torch.Tensor], dict]:
        """Answer one frame: a training step (returns the activations' gradient) or an evaluation forward pass (returns logits).

        ``defer_update=False``: the top's update is done before returning (``complete_step`` has nothing left to do).
        """
        self.complete_step()
        activations = tensors["activations"].to(self.device)
        if kind == "eval_forward":
            self.top.eval()
            with torch.no_grad():
                return "logits", {"logits": self.top(activations).cpu()}, {}
        labels = tensors["labels"].to(self.device)
        training_mode(self.top)
        activations.requires_grad_(True)
        loss = F.cross_entropy(self.top(activations), labels)
        gradient = self._activations_gradient(loss, activations, None, defer_update)
        return "gradient", {"gradient": gradient.cpu()}, {"loss": float(loss.detach())}


class MiddleStage(ServerStage):
    """Server side of ``ushaped``: the middle of the model, no labels, no loss.

    Frames: ``forward`` (activations) -> ``middle`` (outputs), keeping the graph
    in the session state; ``backward`` (gradient of those outputs) ->
    ``gradient`` (gradient of the activations);
    ``eval_forward`` (activations) -> ``middle`` without a graph. A session that
    ends between ``forward`` and ``backward`` leaves the middle untouched. As in
    :class:`TopStage`, the middle's own update is completed after the reply
    (:meth:`complete_step`).
    """

    def __init__(self, middle: nn.Module, optimizer: torch.optim.Optimizer, act_shape: Sequence[int], out_shape: Sequence[int], device: torch.device | str = "cpu"):
        super().__init__(middle, optimizer, device)
        self.middle = self.module
        self.act_shape, self.out_shape = tuple(act_shape), tuple(out_shape)

    def input_specs(self, kind: str, state: dict) -> dict[str, TensorSpec] | None:
        """The tensors a frame of ``kind`` must carry, or None when ``kind`` is not accepted in this state."""
        if kind in ("forward", "eval_forward"):
            return {"activations": TensorSpec(self.act_shape)}
        if kind == "backward" and "pending" in state:
            return {"gradient": TensorSpec(tuple(state["pending"][1].shape), exact=True)}
        return None

    def handle(self, kind: str, tensors: dict[str, torch.Tensor], state: dict, defer_update: bool = True) -> tuple[str, dict[str, torch.Tensor], dict]:
        """Answer one frame: forward the middle (keeping the graph for the backward frame), backward, or evaluate.

        ``defer_update=False``: a backward frame's update of the middle is done before returning.
        """
        self.complete_step()
        if kind == "eval_forward":
            self.middle.eval()
            with torch.no_grad():
                return "middle", {"outputs": self.middle(tensors["activations"].to(self.device)).cpu()}, {}
        if kind == "forward":
            training_mode(self.middle)
            activations = tensors["activations"].to(self.device).requires_grad_(True)
            outputs = self.middle(activations)
            state["pending"] = (activations, outputs)
            return "middle", {"outputs": outputs.detach().cpu()}, {}
        activations, outputs = state.pop("pending")
        gradient = self._activations_gradient(outputs, activations, tensors["gradient"].to(self.device), defer_update)
        return "gradient", {"gradient": gradient.cpu()}, {}


def model_parts(model: StagedModel, cut_stage: str | None, head_stages: int | None = None) -> list[StagedModel]:
    """``[bottom, top]`` (split) or ``[bottom, middle, head]`` (U-shaped) of ``model``."""
    return cut_model(model, cut_points(model, cut_stage, head_stages))


def split_at_cut(
    model: StagedModel, cut_stage: str | None, input_shape: Sequence[int]
) -> tuple[StagedModel, StagedModel, tuple[int, ...]]:
    """``(bottom, top, per-sample shape of the activations at the cut)`` for ``split`` and ``semisup``."""
    bottom, top = model_parts(model, cut_stage)
    return bottom, top, activation_shape(bottom, input_shape)
