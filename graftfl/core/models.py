"""Model zoo. Every model is an ordered sequence of named stages.

A *stage* is the smallest unit a protocol may cut at. ``cut_model`` splits a
:class:`StagedModel` after the named stages, so split learning (bottom/top),
U-shaped learning (bottom/middle/head) and any later protocol share one API.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn


class StagedModel(nn.Sequential):
    """An ``nn.Sequential`` whose children are the model's named stages."""

    @property
    def stage_names(self) -> list[str]:
        """Names of the stages in order, the places where a protocol may cut."""
        return list(self._modules.keys())


def cut_model(model: StagedModel, cut_after: Sequence[str]) -> list[StagedModel]:
    """Cut ``model`` after each stage in ``cut_after`` (in model order).

    The returned parts share parameters with ``model`` (no copy), so running
    them in sequence is the same computation as running the whole model.

    Parameters
    ----------
    model : StagedModel
        The model to cut.
    cut_after : Sequence[str]
        Names of the stages after which a cut is made. ``["conv1"]`` gives
        ``[bottom, top]``; ``["conv1", "fc2"]`` gives ``[bottom, middle, top]``.
    """
    names = model.stage_names
    unknown = [name for name in cut_after if name not in names]
    if unknown:
        raise ValueError(f"unknown cut stage(s) {unknown}; stages of this model: {names}")
    positions = [names.index(name) + 1 for name in cut_after]
    if positions != sorted(set(positions)):
        raise ValueError(f"cut stages must be distinct and in model order; got {list(cut_after)}")
    if positions[-1] >= len(names):
        raise ValueError(f"cannot cut after the last stage '{names[-1]}': the top would be empty")
    bounds = [0, *positions, len(names)]
    stages = list(model.named_children())
    return [StagedModel(OrderedDict(stages[lo:hi])) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _conv_block(in_ch: int, out_ch: int, kernel: int = 5) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool2d(2))


_FLAT_SIZES: dict[tuple, int] = {}  # (architecture, input shape) -> flattened output size


def _flat_size(stages: nn.Module, input_shape: Sequence[int]) -> int:
    # A forward pass on zeros (no random state used); kept per architecture: a simulation worker builds the model per message.
    key = (repr(stages), tuple(input_shape))
    if key not in _FLAT_SIZES:
        with torch.no_grad():
            _FLAT_SIZES[key] = int(stages(torch.zeros(1, *input_shape)).numel())
    return _FLAT_SIZES[key]


def lenet(input_shape: Sequence[int], num_classes: int) -> StagedModel:
    """LeNet-5 style network (two 5x5 conv blocks, three dense layers)."""
    channels = input_shape[0]
    convs = OrderedDict(conv1=_conv_block(channels, 6), conv2=_conv_block(6, 16), flatten=nn.Flatten())
    flat = _flat_size(nn.Sequential(convs), input_shape)
    return StagedModel(
        OrderedDict(
            **convs,
            fc1=nn.Sequential(nn.Linear(flat, 120), nn.ReLU()),
            fc2=nn.Sequential(nn.Linear(120, 84), nn.ReLU()),
            head=nn.Linear(84, num_classes),
        )
    )


def cnn(input_shape: Sequence[int], num_classes: int) -> StagedModel:
    """Small CNN for 32x32 colour images (the shape used by Shokri & Shmatikov and Ko)."""
    channels = input_shape[0]
    convs = OrderedDict(conv1=_conv_block(channels, 32), conv2=_conv_block(32, 64), flatten=nn.Flatten())
    flat = _flat_size(nn.Sequential(convs), input_shape)
    return StagedModel(
        OrderedDict(**convs, fc1=nn.Sequential(nn.Linear(flat, 200), nn.ReLU()), head=nn.Linear(200, num_classes))
    )


def small_cnn(input_shape: Sequence[int], num_classes: int, channels: int = 16, hidden: int = 128) -> StagedModel:
    """One 3x3 convolution (no pooling) and one dense layer: for small inputs such as the 8x8 ``digits``.

    LeNet's 5x5 kernels and two poolings leave a 2x2 map of an 8x8 image and learn slowly
    there; this keeps the whole map and reaches >90% on ``digits`` in a few FedAvg rounds.
    The first stage is a convolution, so split learning's default cut (``conv1``) keeps
    trainable weights at the site.
    """
    height, width = int(input_shape[1]), int(input_shape[2])
    return StagedModel(
        OrderedDict(
            conv1=nn.Sequential(nn.Conv2d(input_shape[0], channels, 3, padding=1), nn.ReLU()),
            flatten=nn.Flatten(),
            fc1=nn.Sequential(nn.Linear(channels * height * width, hidden), nn.ReLU()),
            head=nn.Linear(hidden, num_classes),
        )
    )


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 128, 64)) -> StagedModel:
    """Multilayer perceptron on flattened input (also the feature-protocol classifier)."""
    stages: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = int(torch.tensor(input_shape).prod())
    for i, units in enumerate(hidden, start=1):
        stages[f"fc{i}"] = nn.Sequential(nn.Linear(width, units), nn.ReLU())
        width = units
    stages["head"] = nn.Linear(width, num_classes)
    return StagedModel(stages)


def vgg11(input_shape: Sequence[int], num_classes: int) -> StagedModel:
    """torchvision VGG11 (with batch norm) adapted to small inputs.

    Each max-pool ends a stage; the 4096-wide classifier is replaced by a 512-wide
    one, as is usual for 32x32 inputs.
    """
    from torchvision import models as tv_models  # here, not at the top: importing torchvision costs ~1-2 s per ClientApp process

    features = tv_models.vgg11_bn(weights=None).features
    if input_shape[0] != 3:
        features[0] = nn.Conv2d(input_shape[0], 64, 3, padding=1)
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    block: list[nn.Module] = []
    for layer in features:
        block.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages[f"block{len(stages) + 1}"] = nn.Sequential(*block)
            block = []
    stages["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    stages["fc1"] = nn.Sequential(nn.Linear(512, 512), nn.ReLU())
    stages["head"] = nn.Linear(512, num_classes)
    return StagedModel(stages)


def resnet18(input_shape: Sequence[int], num_classes: int) -> StagedModel:
    """torchvision ResNet-18 with the CIFAR stem (3x3 conv, no max-pool)."""
    from torchvision import models as tv_models  # see vgg11

    net = tv_models.resnet18(weights=None, num_classes=num_classes)
    stem = nn.Sequential(nn.Conv2d(input_shape[0], 64, 3, padding=1, bias=False), net.bn1, net.relu)
    return StagedModel(
        OrderedDict(
            stem=stem,
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
            layer4=net.layer4,
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            head=net.fc,
        )
    )


MODELS: dict[str, Callable[..., StagedModel]] = {
    "lenet": lenet,
    "cnn": cnn,
    "small_cnn": small_cnn,
    "mlp": mlp,
    "vgg11": vgg11,
    "resnet18": resnet18,
}  # core/autoencoder.py adds "conv_ae" (register_model) when it is imported


def register_model(name: str, builder: Callable[..., StagedModel]) -> None:
    """Add a model builder ``builder(input_shape, num_classes, **kwargs)`` to the zoo."""
    MODELS[name] = builder


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> StagedModel:
    """Build a zoo model by name; the error names the valid choices."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid models: {sorted(MODELS)}")
    return MODELS[name](tuple(input_shape), num_classes, **kwargs)


def model_from_config(cfg, input_shape: Sequence[int], num_classes: int) -> StagedModel:
    """The model the run config names (``cfg.model.name`` with ``cfg.model.kwargs``), for this data.

    Parameters
    ----------
    cfg : DictConfig
        The run config (its ``model`` group is read).
    input_shape : sequence of int
        Per-sample input shape, e.g. ``(1, 28, 28)``.
    num_classes : int
        Output classes.
    """
    return build_model(cfg.model.name, input_shape, num_classes, **cfg.model.get("kwargs", {}))


def check_accepts(model: nn.Module, input_shape: Sequence[int], name: str) -> None:
    """A ``ValueError`` naming the model and the shape when ``model`` cannot take a sample of ``input_shape``.

    One forward pass of a zero sample in eval mode without gradients: nothing random is drawn and no
    statistics change; every submodule's mode is restored. The server checks its global model once
    per run, so that a model too deep for the data (VGG11's five poolings on 8x8 digits) stops the
    run before any site trains, instead of failing at every site with a shape error.
    """
    modes = [(module, module.training) for module in model.modules()]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    except RuntimeError as err:
        raise ValueError(f"model '{name}' does not accept inputs of shape {tuple(input_shape)}: {err}") from err
    finally:
        for module, training in modes:
            module.training = training
