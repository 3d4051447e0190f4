"""Model architectures with the Noisy Student model noise: dropout and stochastic depth.

An explicit registry of torchvision families (matched by name prefix) and of small-image models
(`small.py`, matched by exact name): each knows how to build its model with a dropout before
the classifier and stochastic depth (Huang et al. 2016) whose drop probability decays linearly
from 0 at the first block to `stochastic_depth` at the last, as in Noisy Student (Xie et al.
2020, Sec. 3.1: "survival probability 0.8 for the final layer").
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import StochasticDepth

from selftrain.errors import ConfigError
from selftrain.models import small


def _resnet(name: str, num_classes: int, dropout: float, stochastic_depth: float) -> nn.Module:
    return _resnet_noise(models.get_model(name, num_classes=num_classes), dropout, stochastic_depth)


def _resnet_noise(model: models.ResNet, dropout: float, stochastic_depth: float) -> nn.Module:
    """Add dropout before `fc` and stochastic depth on every block of a torchvision ResNet."""
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for i, block in enumerate(blocks):
        # The last BatchNorm of a block ends its residual branch (before `out += identity`), so
        # dropping its output per sample is exactly stochastic depth on that block.
        p = stochastic_depth * i / max(len(blocks) - 1, 1)
        last_bn = "bn3" if isinstance(block, Bottleneck) else "bn2"
        setattr(block, last_bn, nn.Sequential(getattr(block, last_bn), StochasticDepth(p, "row")))
    model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    return model


def _efficientnet(name: str, num_classes: int, dropout: float, stochastic_depth: float) -> nn.Module:
    # torchvision's EfficientNet implements both noises natively with the same linear decay.
    return models.get_model(name, num_classes=num_classes, dropout=dropout,
                            stochastic_depth_prob=stochastic_depth)


def _convnext(name: str, num_classes: int, dropout: float, stochastic_depth: float) -> nn.Module:
    model = models.get_model(name, num_classes=num_classes, stochastic_depth_prob=stochastic_depth)
    model.classifier[-1] = nn.Sequential(nn.Dropout(dropout), model.classifier[-1])
    return model


FAMILIES: dict[str, Callable[[str, int, float, float], nn.Module]] = {
    "resnet": _resnet,
    "wide_resnet": _resnet,
    "resnext": _resnet,
    "efficientnet_": _efficientnet,
    "convnext_": _convnext,
}


def _resnet18_cifar(num_classes: int, dropout: float, stochastic_depth: float) -> nn.Module:
    return _resnet_noise(small.resnet18_cifar(num_classes), dropout, stochastic_depth)


# Small-image models by exact name (checked before FAMILIES: "resnet18_cifar" starts "resnet").
SMALL_MODELS: dict[str, Callable[[int, float, float], nn.Module]] = {
    "wrn_28_2": partial(small.wide_resnet_28, 2),
    "wrn_28_8": partial(small.wide_resnet_28, 8),
    "resnet18_cifar": _resnet18_cifar,
    "cnn_small": small.cnn_small,  # ignores stochastic_depth: it has no residual blocks
    "cnn_tiny": small.cnn_tiny,  # the same at half the width
}


def available_models() -> list[str]:
    return sorted([
        *SMALL_MODELS,
        *(name for name in models.list_models(module=models)
          if any(name.startswith(prefix) for prefix in FAMILIES)),
    ])


def build_model(name: str, num_classes: int, dropout: float = 0.0, stochastic_depth: float = 0.0) -> nn.Module:
    if name not in available_models():
        raise ConfigError(f"model {name!r} is not supported; choose one of: {', '.join(available_models())}")
    if name in SMALL_MODELS:
        return SMALL_MODELS[name](num_classes, dropout, stochastic_depth)
    family = next(prefix for prefix in FAMILIES if name.startswith(prefix))
    return FAMILIES[family](name, num_classes, dropout, stochastic_depth)


def parameter_count(name: str, num_classes: int) -> int:
    with torch.device("meta"):  # no memory, no init cost
        model = build_model(name, num_classes)
    return sum(p.numel() for p in model.parameters())


def check_student_sizes(teacher: str, students: list[str], num_classes: int) -> None:
    """Noisy Student needs each student equal to or larger than its teacher (Sec. 2)."""
    chain = [teacher, *students]
    sizes = [parameter_count(name, num_classes) for name in chain]
    for i in range(1, len(chain)):
        if sizes[i] < sizes[i - 1]:
            key = "model.teacher" if i == 1 else f"model.students[{i - 2}]"
            raise ConfigError(
                f"model.students[{i - 1}]={chain[i]} ({sizes[i]:,} parameters) is smaller than "
                f"{key}={chain[i - 1]} ({sizes[i - 1]:,}); a student must be equal or larger"
            )
