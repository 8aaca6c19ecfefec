"""ResNets with basic blocks: CIFAR ``resnet20``/``resnet56`` and ImageNet-style ``resnet18``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import STEMS, check_choice, check_common, conv_bn_act, init_weights
from .registry import MODELS


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or 1x1 conv+BN (option-B) shortcut.

    Input: ``[B, in_ch, H, W]``. Output: ``[B, out_ch, H / stride, W / stride]``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn_act(out_ch, out_ch, 3, act=None)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, then stages of :class:`BasicBlock` (the first block of every stage but the first
    downsamples by 2), global average pool and a ``Linear`` classifier.

    Input: ``[B, in_channels, H, W]``. Output: ``[B, num_classes]``.
    """

    def __init__(
        self,
        stem: nn.Module,
        stem_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = stem
        stages: list[nn.Module] = []
        in_ch = stem_channels
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = [BasicBlock(in_ch, width, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, num_classes]``."""
        return self.fc(self.pool(self.stages(self.stem(x))))


def cifar_resnet(blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet of depth ``6 * blocks_per_stage + 2`` (stages 16/32/64), input ``[B, 3, 32, 32]``."""
    check_common(num_classes, in_channels)
    stem = conv_bn_act(in_channels, 16, 3)
    return ResNet(stem, 16, (16, 32, 64), (blocks_per_stage,) * 3, num_classes)


def make_stem(stem: str, in_channels: int, out_ch: int) -> nn.Sequential:
    """``"imagenet"``: 7x7 stride-2 conv + 3x3 stride-2 max pool; ``"cifar"``: 3x3 stride-1 conv."""
    check_choice("stem", stem, STEMS)
    if stem == "imagenet":
        return nn.Sequential(conv_bn_act(in_channels, out_ch, 7, 2), nn.MaxPool2d(3, 2, 1))
    return conv_bn_act(in_channels, out_ch, 3)


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
    return ResNet(make_stem(stem, in_channels, 64), 64, (64, 128, 256, 512), (2, 2, 2, 2), num_classes)
