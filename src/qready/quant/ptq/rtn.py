"""Round to nearest: every weight independently onto the grid of its scale group (no calibration)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..functional import compute_qparams, fake_quantize
from ..layers import layer_spec
from ..spec import QuantSpec
from .capture import LayerStats
from .methods import PTQ_METHODS
from .params import record_params


@torch.no_grad()
def round_to_nearest(module: nn.Module, spec: QuantSpec) -> None:
    """Replace ``module.weight`` by its round-to-nearest fake quantization (channel axis from the layer
    table) and record the parameters on the module (see :mod:`qready.quant.ptq.params`)."""
    weight = module.weight
    spec = layer_spec(module, spec)
    params = compute_qparams(weight, spec)
    weight.copy_(fake_quantize(weight, spec, params))
    record_params(module, params)


@PTQ_METHODS.register("rtn")
@dataclass(frozen=True)
class RTN:
    """Round to nearest; scales and zero points from the spec's range method (min-max, MSE, percentile)."""

    uses_calibration: ClassVar[bool] = False

    def quantize_layer(self, name: str, module: nn.Module, spec: QuantSpec, stats: LayerStats | None) -> None:
        """Quantize ``module.weight`` in place; ``stats`` is not used."""
        round_to_nearest(module, spec)
