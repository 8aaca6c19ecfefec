"""Empirical bias correction (Nagel et al., 2019): remove the mean output shift quantization causes.

Quantizing ``W`` to ``Q(W)`` shifts each output channel's mean by ``(Q(W) - W) E[x]`` (``E[x]`` the mean
input column on the calibration data: the mean feature vector for a linear layer, the mean im2col
column for a convolution). The bias absorbs it: ``b <- b - (Q(W) - W) E[x]``. A layer without a bias
gets one (zeros before the correction), so the correction also applies to convolutions followed by
batch normalisation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import out_axis
from .capture import LayerStats, weight_matrix


def output_shift(module: nn.Module, original: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """Mean output change ``(Q(W) - W) E[x]`` per output channel, ``[out]`` float64."""
    delta = weight_matrix(module, module.weight.detach() - original).to(torch.float64)  # [G, R, K]
    return torch.bmm(delta, stats.mean()[:, :, None]).reshape(-1)


@torch.no_grad()
def correct_bias(module: nn.Module, original: torch.Tensor, stats: LayerStats) -> None:
    """Subtract the output shift of ``module`` (weight already quantized; ``original`` its float weight)
    from its bias, adding a zero bias first when it has none."""
    shift = output_shift(module, original, stats)
    if getattr(module, "bias", None) is None:
        channels = module.weight.shape[out_axis(module)]
        module.bias = nn.Parameter(torch.zeros(channels, dtype=module.weight.dtype, device=module.weight.device))
    module.bias.sub_(shift.to(module.bias.dtype))
