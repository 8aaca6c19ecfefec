"""Multi-layer perceptron on flattened inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..checks import check_int
from ._common import init_weights
from .registry import MODELS


class MLP(nn.Module):
    """``Flatten -> [Linear -> ReLU] * len(hidden) -> Linear``.

    Input: any ``[B, ...]`` whose trailing dims hold ``in_features`` values. Output: ``[B, num_classes]``.
    """

    def __init__(
        self, in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10
    ) -> None:
        super().__init__()
        check_int("in_features", in_features, minimum=1)
        check_int("num_classes", num_classes, minimum=1)
        if isinstance(hidden, int) or not isinstance(hidden, Sequence):
            raise ValueError(f"hidden must be a tuple of integers >= 1, got {hidden!r}")
        for i, h in enumerate(hidden):
            check_int(f"hidden[{i}]", h, minimum=1)
        self.in_features = in_features
        self.hidden = tuple(hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...] -> [B, num_classes]``."""
        return self.net(x)


@MODELS.register("mlp")
def mlp(in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10) -> MLP:
    """MLP for flattened inputs (default: 8x8 digits, 64 features)."""
    return MLP(in_features=in_features, hidden=hidden, num_classes=num_classes)
