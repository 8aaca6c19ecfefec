"""AlexNet-style CNN for 32x32 inputs (CIFAR)."""

from __future__ import annotations

from torch import nn

from ..checks import check_int
from ._common import FeatureClassifier, check_common, global_avg_pool, init_weights
from .registry import MODELS


def _conv(in_ch: int, out_ch: int, kernel_size: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU())
    return layers


class AlexNet(FeatureClassifier):
    """Five convs (64-5x5, 192-5x5, 384, 256, 256 3x3; max pools after 1st, 2nd, 5th) then three
    ``Linear`` layers (``256*4*4 -> hidden -> hidden -> num_classes``) with dropout.

    Input: ``[B, in_channels, 32, 32]``. Output: ``[B, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: bool = True,
        hidden: int = 1024,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_common(num_classes, in_channels)
        check_int("hidden", hidden, minimum=1)
        if not isinstance(batch_norm, bool):
            raise ValueError(f"batch_norm must be True or False, got {batch_norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.features = nn.Sequential(
            *_conv(in_channels, 64, 5, batch_norm), nn.MaxPool2d(2),
            *_conv(64, 192, 5, batch_norm), nn.MaxPool2d(2),
            *_conv(192, 384, 3, batch_norm),
            *_conv(384, 256, 3, batch_norm),
            *_conv(256, 256, 3, batch_norm), nn.MaxPool2d(2),
        )  # fmt: skip
        # Fixed 4x4 grid for the classifier (a no-op at 32x32 input).
        self.pool = global_avg_pool(4)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 4 * 4, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip
        init_weights(self)



@MODELS.register("alexnet")
def alexnet(num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True) -> AlexNet:
    """AlexNet-style CNN for CIFAR (~7.7M params), input ``[B, 3, 32, 32]``."""
    return AlexNet(num_classes=num_classes, in_channels=in_channels, batch_norm=batch_norm)
