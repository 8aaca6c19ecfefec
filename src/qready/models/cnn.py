"""Small CNNs for the toy data sets: ``dwcnn`` (8x8 digits) and ``cnn1d`` (MNIST-1D)."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_int
from ._common import FeatureClassifier, check_common, conv_bn_act, global_avg_pool, init_weights
from .registry import MODELS


def dw_separable(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (``groups=in_ch``) + BN + ReLU, then pointwise 1x1 + BN + ReLU."""
    return nn.Sequential(
        conv_bn_act(in_ch, in_ch, 3, stride, groups=in_ch),
        conv_bn_act(in_ch, out_ch, 1),
    )


class DWCNN(FeatureClassifier):
    """Depthwise-separable CNN for 8x8 digits.

    Input: ``[B, in_channels, 8, 8]`` (any spatial size works). Output: ``[B, num_classes]``.
    Layout: 3x3 stem (``in_channels -> width``), three separable blocks
    (``width -> width``, ``width -> 2*width`` with stride 2, ``2*width -> 2*width``), global average
    pool, ``Linear(2*width, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        check_common(num_classes, in_channels)
        check_int("width", width, minimum=1)
        self.features = nn.Sequential(
            conv_bn_act(in_channels, width, 3),
            dw_separable(width, width),
            dw_separable(width, 2 * width, stride=2),
            dw_separable(2 * width, 2 * width),
        )
        self.pool = global_avg_pool()
        self.classifier = nn.Linear(2 * width, num_classes)
        init_weights(self)



def conv1d_bn_relu(in_ch: int, out_ch: int, kernel_size: int = 5, stride: int = 1) -> nn.Sequential:
    """``Conv1d`` (no bias) + ``BatchNorm1d`` + ``ReLU``."""
    return nn.Sequential(
        nn.Conv1d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm1d(out_ch),
        nn.ReLU(),
    )


class CNN1D(nn.Module):
    """1-D CNN for MNIST-1D.

    Input: ``[B, in_channels, L]`` (``L = 40`` for MNIST-1D), or ``[B, L]`` when ``in_channels == 1``.
    Output: ``[B, num_classes]``. Layout: three kernel-5 conv blocks
    (``in_channels -> width -> 2*width -> 2*width``, the last two with stride 2), global average pool,
    ``Linear(2*width, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        check_common(num_classes, in_channels)
        check_int("width", width, minimum=1)
        self.in_channels = in_channels
        self.features = nn.Sequential(
            conv1d_bn_relu(in_channels, width),
            conv1d_bn_relu(width, 2 * width, stride=2),
            conv1d_bn_relu(2 * width, 2 * width, stride=2),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, L]`` or ``[B, L]`` -> ``[B, num_classes]``."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.classifier(self.pool(self.features(x)))


@MODELS.register("dwcnn")
def dwcnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> DWCNN:
    """Depthwise-separable CNN for 8x8 digits, input ``[B, 1, 8, 8]``."""
    return DWCNN(num_classes=num_classes, in_channels=in_channels, width=width)


@MODELS.register("cnn1d")
def cnn1d(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> CNN1D:
    """1-D CNN for MNIST-1D, input ``[B, 1, 40]`` or ``[B, 40]``."""
    return CNN1D(num_classes=num_classes, in_channels=in_channels, width=width)
