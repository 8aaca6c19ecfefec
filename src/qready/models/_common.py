"""Shared helpers for the model zoo: argument checks, weight init and small conv blocks."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_float, check_int

STEMS = ("imagenet", "cifar")


def check_width_mult(value: object) -> float:
    """Return ``width_mult`` as a float if it is finite and > 0, else raise ``ValueError``."""
    return check_float("width_mult", value, minimum=0.0, maximum=math.inf, exclusive=True)


def global_avg_pool(output_size: int = 1) -> nn.Sequential:
    """Adaptive 2-D average pooling to ``output_size``², then flatten: ``[B, C, H, W] -> [B, C·s²]``."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(output_size), nn.Flatten())


class FeatureClassifier(nn.Module):
    """The common shape of the zoo's image classifiers: ``features`` -> ``pool`` -> ``classifier``
    (submodules set by the subclass), ``[B, C, H, W] -> [B, num_classes]``."""

    features: nn.Module
    pool: nn.Module
    classifier: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def check_common(num_classes: object, in_channels: object) -> None:
    """Validate the two constructor arguments shared by every model."""
    check_int("num_classes", num_classes, minimum=1)
    check_int("in_channels", in_channels, minimum=1)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going down by more than 10%."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def init_weights(model: nn.Module) -> nn.Module:
    """Standard init: Kaiming-normal convs, Kaiming-uniform linears, zero biases, BN weight 1."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def conv_bn_act(
    in_ch: int,
    out_ch: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """``Conv2d`` (no bias, 'same'-style padding) + ``BatchNorm2d`` + optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act())  # not in-place: activation hooks may keep BN outputs
    return nn.Sequential(*layers)
