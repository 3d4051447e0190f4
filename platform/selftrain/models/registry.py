"""torchvision architectures with the Noisy Student model noise: dropout and stochastic depth.

An explicit registry of families: each knows how to build its torchvision model with a dropout
before the classifier and stochastic depth (Huang et al. 2016) whose drop probability decays
linearly from 0 at the first block to `stochastic_depth` at the last, as in Noisy Student
(Xie et al. 2020, Sec. 3.1: "survival probability 0.8 for the final layer").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import StochasticDepth

from selftrain.errors import ConfigError


def _resnet(name: str, num_classes: int, dropout: float, stochastic_depth: float) -> nn.Module:
    model = models.get_model(name, num_classes=num_classes)
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


def available_models() -> list[str]:
    return sorted(
        name for name in models.list_models(module=models)
        if any(name.startswith(prefix) for prefix in FAMILIES)
    )


def build_model(name: str, num_classes: int, dropout: float = 0.0, stochastic_depth: float = 0.0) -> nn.Module:
    if name not in available_models():
        raise ConfigError(f"model {name!r} is not supported; choose one of: {', '.join(available_models())}")
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
