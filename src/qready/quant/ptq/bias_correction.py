"""Empirical bias correction (Nagel et al., 2019): remove the mean output shift quantization causes.

Two targets, chosen by ``bias_correction``:

* ``"layer"`` (``True``): quantizing ``W`` to ``Q(W)`` shifts each output channel's mean by
  ``(Q(W) - W) E[x]`` (``E[x]`` the mean input column on the calibration data, from the model whose
  earlier layers are already quantized: the mean feature vector for a linear layer, the mean im2col
  column for a convolution). The bias absorbs it: ``b <- b - (Q(W) - W) E[x]``.
* ``"model"``: each layer's mean output is matched to the *float model's*, ``W E[x_float]``: the bias
  also absorbs the mean shift the earlier quantized layers left in the layer's input,
  ``b <- b - (Q(W) E[x] - W E[x_float])``. The float means come from one extra pass over the float
  model. Both targets coincide when the layer's inputs are the float model's (the first layer, or
  ``sequential=False``).

A layer without a bias gets one (zeros before the correction), so the correction also applies to
convolutions followed by batch normalisation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import out_axis
from .capture import LayerStats, weight_matrix

BIAS_CORRECTIONS = ("layer", "model")


def bias_correction_target(value: bool | str | None) -> str | None:
    """The correction target of a ``bias_correction`` option: ``None`` (off), ``"layer"`` or ``"model"``.

    ``False``/``None`` is off and ``True`` means ``"layer"``; anything else raises a ``ValueError``.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "layer"
    if isinstance(value, str) and value in BIAS_CORRECTIONS:
        return value
    raise ValueError(f"bias_correction must be a bool or one of {list(BIAS_CORRECTIONS)}; got {value!r}")


def output_shift(module: nn.Module, original: torch.Tensor, stats: LayerStats,
                 float_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Mean output change per output channel, ``[out]`` float64: ``(Q(W) - W) E[x]``, or with
    ``float_mean`` (``[G, K]``, the float model's mean input column) ``Q(W) E[x] - W E[x_float]``."""
    quantized = weight_matrix(module).detach().to(torch.float64)  # [G, R, K]
    float_weight = weight_matrix(module, original).to(torch.float64)
    target = stats.mean() if float_mean is None else float_mean
    shift = torch.bmm(quantized, stats.mean()[:, :, None]) - torch.bmm(float_weight, target[:, :, None])
    return shift.reshape(-1)


@torch.no_grad()
def correct_bias(module: nn.Module, original: torch.Tensor, stats: LayerStats,
                 float_mean: torch.Tensor | None = None) -> None:
    """Subtract the output shift of ``module`` (weight already quantized; ``original`` its float weight;
    ``float_mean``: see :func:`output_shift`) from its bias, adding a zero bias first when it has none."""
    shift = output_shift(module, original, stats, float_mean)
    if getattr(module, "bias", None) is None:
        channels = module.weight.shape[out_axis(module)]
        module.bias = nn.Parameter(torch.zeros(channels, dtype=module.weight.dtype, device=module.weight.device))
    module.bias.sub_(shift.to(module.bias.dtype))
