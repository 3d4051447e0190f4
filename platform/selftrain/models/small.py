"""Backbones for small images (CIFAR-like, 24-32 px) with the Noisy Student model noise.

torchvision's ImageNet models downsample 4x in their stem (stride-2 conv + max pool), which on
a 32 px image leaves 8x8 feature maps before the first residual stage and wastes most of the
network. The semi-supervised literature therefore benchmarks on CIFAR-style networks instead:

- `wide_resnet_28`: WRN-28-k (Zagoruyko & Komodakis 2016) exactly as FixMatch (Sohn et al. 2020,
  appendix) and USB use it: WRN-28-2 (1.47M parameters) for CIFAR-10/SVHN, WRN-28-8 for CIFAR-100.
- `resnet18_cifar`: torchvision's ResNet-18 with the usual CIFAR stem (3x3 stride-1 conv1, no
  max pool). The registry adds its noise with the same code as every other torchvision ResNet.
- `cnn_small`: a fast VGG-style CNN ("conv-large"-lite) for laptops, a few hundred K parameters.

All end in global average pooling, so any input of at least 8 px works. Noise follows Noisy
Student (Xie et al. 2020, Sec. 3.1): dropout before the classifier and stochastic depth (Huang
et al. 2016) with drop probability decaying linearly from 0 at the first residual block to
`stochastic_depth` at the last.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models
from torchvision.ops import StochasticDepth

# FixMatch's TF reference uses BatchNorm decay 0.999 (PyTorch momentum 0.001) and epsilon 1e-3,
# for 2^20 steps. At the few thousand steps of a CPU run, running averages at 0.001 still hold
# 0.999^2000 = 14% of their initial (0, 1): the evaluated model (which uses them) lags its
# weights. 0.01 forgets the start within a few hundred steps; the weights' own EMA (ema_decay)
# does the smoothing that the slow decay did in the reference.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
LEAKY_SLOPE = 0.1  # FixMatch/MixMatch WRN use LeakyReLU(0.1), not ReLU


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    # No bias, as in the PyTorch FixMatch ports: each conv output reaches a BatchNorm (of this
    # block or, via the sum, the next one), which cancels a bias. This gives 1,467,610 parameters
    # for WRN-28-2 with 10 classes (the TF reference's redundant conv biases add 2,032 more).
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class WideBasicBlock(nn.Module):
    """Pre-activation basic block, following FixMatch's `residual()` (libml/models.py).

    The residual branch is BN-act-conv3x3(stride)-BN-act-conv3x3. The shortcut is the identity
    when shapes match and a 1x1 conv otherwise; it reads the raw input except in the very first
    block of the network (`activate_before_residual`), where it reads the pre-activated input,
    as in the reference. Stochastic depth drops the whole residual branch per sample.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_path: float,
                 activate_before_residual: bool = False) -> None:
        super().__init__()
        self.bn1 = _bn(in_ch)
        self.act1 = nn.LeakyReLU(LEAKY_SLOPE)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = _bn(out_ch)
        self.act2 = nn.LeakyReLU(LEAKY_SLOPE)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.stochastic_depth = StochasticDepth(drop_path, "row")
        self.activate_before_residual = activate_before_residual
        self.shortcut: nn.Module | None = None
        if in_ch != out_ch or stride != 1:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        if self.activate_before_residual:
            x = pre
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        identity = x if self.shortcut is None else self.shortcut(x)
        return identity + self.stochastic_depth(out)


class WideResNet(nn.Module):
    """WRN-depth-k for 32 px images: conv stem (16 ch), three groups of (depth-4)/6 blocks with
    widths 16k/32k/64k and strides 1/2/2, then BN-act, global average pool, dropout, linear."""

    def __init__(self, num_classes: int, depth: int = 28, widen: int = 2, dropout: float = 0.0,
                 stochastic_depth: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        per_group = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        n_blocks = 3 * per_group
        self.conv1 = _conv3x3(3, widths[0])
        blocks: list[nn.Module] = []
        for g, stride in enumerate((1, 2, 2)):
            for j in range(per_group):
                i = len(blocks)
                blocks.append(WideBasicBlock(
                    widths[g] if j == 0 else widths[g + 1], widths[g + 1], stride if j == 0 else 1,
                    drop_path=stochastic_depth * i / max(n_blocks - 1, 1),
                    activate_before_residual=(i == 0),
                ))
        self.blocks = nn.Sequential(*blocks)
        self.bn = _bn(widths[-1])
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As in the FixMatch PyTorch ports (kekmodel, USB): He init for convs, Xavier for the
        # classifier with a zero bias. nn.init works on `meta` tensors (a no-op), so
        # `registry.parameter_count` can build this model without allocating memory.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.blocks(self.conv1(x))))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


def wide_resnet_28(widen: int, num_classes: int, dropout: float = 0.0,
                   stochastic_depth: float = 0.0) -> WideResNet:
    return WideResNet(num_classes, depth=28, widen=widen, dropout=dropout,
                      stochastic_depth=stochastic_depth)


def resnet18_cifar(num_classes: int) -> models.ResNet:
    """torchvision ResNet-18 with the CIFAR stem (He et al. 2016 Sec. 4.2 style): a 3x3 stride-1
    conv1 and no max pool, so layer1 sees 32x32 maps from a 32 px image instead of 8x8.

    Noise-free: the registry adds dropout and stochastic depth with its torchvision-ResNet code.
    """
    model = models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same init torchvision applies to its own conv1.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


class SmallCNN(nn.Module):
    """Three stages of [conv3x3-BN-ReLU x2, max pool 2] with widths 32/64/128 (a slimmed
    "conv-large" of Laine & Aila 2017 / Miyato et al. 2018), global average pool, dropout, linear.

    About 0.29M parameters and ~22M multiply-adds per 24 px image: trains on two CPU cores.
    It has no residual blocks, so `stochastic_depth` does not apply and is ignored.
    """

    def __init__(self, num_classes: int, dropout: float = 0.0, stochastic_depth: float = 0.0,
                 widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        del stochastic_depth  # accepted for a uniform builder signature; see the docstring
        layers: list[nn.Module] = []
        in_ch = 3
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                in_ch = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(self.dropout(torch.flatten(x, 1)))


def cnn_small(num_classes: int, dropout: float = 0.0, stochastic_depth: float = 0.0) -> SmallCNN:
    """Build SmallCNN; `stochastic_depth` is ignored (no residual blocks to drop)."""
    return SmallCNN(num_classes, dropout=dropout, stochastic_depth=stochastic_depth)


def cnn_tiny(num_classes: int, dropout: float = 0.0, stochastic_depth: float = 0.0) -> SmallCNN:
    """SmallCNN at half the width (16/32/64, about 73K parameters, ~4x fewer multiply-adds): for
    8-16 px images such as the digits, where it keeps up with a 2-core laptop's data pipeline."""
    return SmallCNN(num_classes, dropout=dropout, stochastic_depth=stochastic_depth, widths=(16, 32, 64))
