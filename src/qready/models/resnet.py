"""ResNets with basic blocks: CIFAR ``resnet20``/``resnet56`` and ImageNet-style ``resnet18``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..checks import check_choice
from ._common import STEMS, check_common, global_avg_pool, init_weights
from .registry import MODELS


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or 1x1 conv+BN (option-B) ``downsample`` shortcut.

    Parameter names follow torchvision (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample.0/1``).
    Input: ``[B, in_ch, H, W]``. Output: ``[B, out_ch, H / stride, W / stride]``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """Stem (``conv1``, ``bn1``, ReLU, ``maxpool``), then stages ``layer1``, ``layer2``, ... of
    :class:`BasicBlock` (the first block of every stage but the first downsamples by 2), global
    average pool and a ``Linear`` classifier ``fc``.

    ``stem="imagenet"``: 7x7 stride-2 conv + 3x3 stride-2 max pool; ``"cifar"``: 3x3 stride-1 conv, no
    pool. Parameter names follow torchvision's ResNets, so a torchvision ResNet-18 checkpoint loads
    unchanged into ``resnet18``. Input: ``[B, in_channels, H, W]``. Output: ``[B, num_classes]``.
    """

    def __init__(
        self,
        stem: str,
        in_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        check_choice("stem", stem, STEMS)
        in_ch = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, in_ch, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, in_ch, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.num_stages = len(widths)
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = [BasicBlock(in_ch, width, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width
        self.pool = global_avg_pool()
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map: ``[B, C, H, W] -> [B, widths[-1], H / s, W / s]`` (``s`` = 32 for the
        ImageNet stem with four stages, 4 for the CIFAR stem with three)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, num_classes]``."""
        return self.fc(self.pool(self.features(x)))


def cifar_resnet(blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet of depth ``6 * blocks_per_stage + 2`` (stages 16/32/64), input ``[B, 3, 32, 32]``."""
    check_common(num_classes, in_channels)
    return ResNet("cifar", in_channels, (16, 32, 64), (blocks_per_stage,) * 3, num_classes)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-20 (3x3 basic blocks per stage, ~0.27M params), input ``[B, 3, 32, 32]``."""
    return cifar_resnet(3, num_classes, in_channels)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-56 (3x9 basic blocks per stage, ~0.86M params), input ``[B, 3, 32, 32]``."""
    return cifar_resnet(9, num_classes, in_channels)


@MODELS.register("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet") -> ResNet:
    """ResNet-18 (stages 64/128/256/512, 2 blocks each), input ``[B, 3, 224, 224]`` (``"imagenet"``
    stem) or ``[B, 3, 32, 32]`` (``"cifar"`` stem)."""
    check_common(num_classes, in_channels)
    return ResNet(stem, in_channels, (64, 128, 256, 512), (2, 2, 2, 2), num_classes)
