"""MobileNet v1 (depthwise-separable) and v2 (inverted residuals, linear bottlenecks)."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_choice
from ._common import (
    STEMS,
    FeatureClassifier,
    check_common,
    check_width_mult,
    conv_bn_act,
    global_avg_pool,
    init_weights,
    make_divisible,
)
from .registry import MODELS

# (out_channels, stride) of each depthwise-separable block of MobileNet v1.
V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip

# (expansion t, out_channels c, repeats n, first stride s) of MobileNet v2.
V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)  # fmt: skip


def _check(num_classes: int, in_channels: int, width_mult: float, stem: str) -> float:
    check_common(num_classes, in_channels)
    check_choice("stem", stem, STEMS)
    return check_width_mult(width_mult)


class MobileNetV1(FeatureClassifier):
    """MobileNet v1: 3x3 stem conv then 13 depthwise-separable blocks, global pool, ``Linear``.

    ``stem="imagenet"``: stride-2 stem, input ``[B, 3, 224, 224]`` (32x downsampling).
    ``stem="cifar"``: stride-1 stem and the first stride-2 block made stride 1, for ``[B, 3, 32, 32]``
    (8x downsampling). Channels are ``make_divisible(c * width_mult, 8)``. Output: ``[B, num_classes]``.
    """

    def __init__(
        self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, stem: str = "imagenet"
    ) -> None:
        super().__init__()
        width_mult = _check(num_classes, in_channels, width_mult, stem)
        cifar = stem == "cifar"
        ch = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [conv_bn_act(in_channels, ch, 3, 1 if cifar else 2)]
        for i, (c, s) in enumerate(V1_BLOCKS):
            out = make_divisible(c * width_mult)
            stride = 1 if cifar and i == 1 else s
            layers.append(nn.Sequential(conv_bn_act(ch, ch, 3, stride, groups=ch), conv_bn_act(ch, out, 1)))
            ch = out
        self.features = nn.Sequential(*layers)
        self.pool = global_avg_pool()
        self.classifier = nn.Linear(ch, num_classes)
        init_weights(self)



class InvertedResidual(nn.Module):
    """1x1 expand (skipped when ``expansion == 1``) + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear
    projection; adds the input when ``stride == 1`` and ``in_ch == out_ch``.

    The projection's ``Conv2d`` and ``BatchNorm2d`` sit directly in ``conv`` (not in a sub-block), so
    the parameter names are torchvision's (``conv.0.0.weight`` ... ``conv.2.weight``, ``conv.3.*``).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            *conv_bn_act(hidden, out_ch, 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(FeatureClassifier):
    """MobileNet v2: 3x3 stem, 17 inverted-residual blocks, 1x1 conv to 1280, pool, dropout, ``Linear``.

    ``stem="imagenet"``: input ``[B, 3, 224, 224]`` (32x downsampling). ``stem="cifar"``: stride-1
    stem and the stride-2 of the 24-channel stage made 1, for ``[B, 3, 32, 32]`` (8x downsampling).
    Channels are ``make_divisible(c * width_mult, 8)``; the last conv keeps >= 1280 channels.
    Output: ``[B, num_classes]``. Parameter names follow torchvision's ``mobilenet_v2``, so its
    ImageNet checkpoint loads unchanged (``create_model("mobilenet_v2", weights=path)``).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        width_mult: float = 1.0,
        stem: str = "imagenet",
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        width_mult = _check(num_classes, in_channels, width_mult, stem)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        cifar = stem == "cifar"
        ch = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [conv_bn_act(in_channels, ch, 3, 1 if cifar else 2, act=nn.ReLU6)]
        for i, (t, c, n, s) in enumerate(V2_STAGES):
            out = make_divisible(c * width_mult)
            first_stride = 1 if cifar and i == 1 else s
            for j in range(n):
                layers.append(InvertedResidual(ch, out, first_stride if j == 0 else 1, t))
                ch = out
        last = make_divisible(1280 * max(1.0, width_mult))
        layers.append(conv_bn_act(ch, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = global_avg_pool()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        init_weights(self)



@MODELS.register("mobilenet_v1")
def mobilenet_v1(
    num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, stem: str = "imagenet"
) -> MobileNetV1:
    """MobileNet v1 (~4.2M params at width 1.0, 1000 classes)."""
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, stem=stem)


@MODELS.register("mobilenet_v2")
def mobilenet_v2(
    num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, stem: str = "imagenet"
) -> MobileNetV2:
    """MobileNet v2 (~3.5M params at width 1.0, 1000 classes)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, stem=stem)
