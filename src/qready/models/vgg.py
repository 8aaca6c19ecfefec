"""VGG-16 for 32x32 inputs (CIFAR)."""

from __future__ import annotations

from torch import nn

from ._common import FeatureClassifier, check_common, global_avg_pool, init_weights
from .registry import MODELS

# Conv widths; "M" is a 2x2 max pool. Five pools take 32x32 down to 1x1.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG(FeatureClassifier):
    """VGG feature stack (3x3 convs, optional BN, ReLU, max pools), then ``Linear(512, num_classes)``.

    Input: ``[B, in_channels, 32, 32]``. Output: ``[B, num_classes]``.
    """

    def __init__(
        self, cfg: tuple[int | str, ...], num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True
    ) -> None:
        super().__init__()
        check_common(num_classes, in_channels)
        if not isinstance(batch_norm, bool):
            raise ValueError(f"batch_norm must be True or False, got {batch_norm!r}")
        layers: list[nn.Module] = []
        ch = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(ch, v, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU())
            ch = v
        self.features = nn.Sequential(*layers)
        # Global pool makes the head independent of input size (a no-op at 32x32).
        self.pool = global_avg_pool()
        self.classifier = nn.Linear(ch, num_classes)
        init_weights(self)



@MODELS.register("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True) -> VGG:
    """VGG-16 for CIFAR (~14.7M params), input ``[B, 3, 32, 32]``."""
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels, batch_norm=batch_norm)
