"""The quantization parameters a PTQ method used for a layer, kept on the layer for export.

Error-compensating methods (GPTQ) choose scales that the quantized weight alone does not reveal (the
element that set a group's range may have moved to a smaller code), so re-deriving them from the
weight can fail. The method records its :class:`~qready.quant.QuantParams` on the module (attribute
:data:`PARAMS_ATTR`, not part of the ``state_dict``); :func:`recorded_codes` gives the integer codes
that reproduce the weight exactly with them, which packed export stores.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import code_dtype, dequantize
from ..grid import from_rows, round_to_grid, to_rows
from ..spec import QuantParams, QuantSpec

PARAMS_ATTR = "weight_qparams"


def record_params(module: nn.Module, params: QuantParams) -> None:
    """Keep ``params`` on ``module`` (a plain attribute: survives deepcopy, not the state_dict)."""
    object.__setattr__(module, PARAMS_ATTR, params)


def recorded_params(module: nn.Module) -> QuantParams | None:
    """The parameters recorded on ``module``, if any."""
    params = module.__dict__.get(PARAMS_ATTR)
    return params if isinstance(params, QuantParams) else None


@torch.no_grad()
def recorded_codes(module: nn.Module, weight: torch.Tensor | None = None, spec: QuantSpec | None = None
                   ) -> tuple[torch.Tensor, QuantParams] | None:
    """``(codes, params)`` with ``dequantize(codes, params) == weight`` bit for bit using the recorded
    parameters (``weight`` defaults to the module's), or ``None`` when none are recorded, they are not
    of ``spec``'s grid (bits, code range, granularity, group size), or the weight is no longer on
    their grid (e.g. changed after quantization)."""
    params = recorded_params(module)
    weight = (module.weight if weight is None else weight).detach().float()
    if params is None or tuple(weight.shape) != tuple(params.shape):
        return None
    if spec is not None and (params.bits, params.qmin, params.qmax, params.granularity, params.group_size) != (
            spec.bits, spec.qmin, spec.qmax, spec.granularity, spec.group_size):
        return None
    rows = to_rows(weight, params.granularity, params.axis, params.group_size)
    if params.extra.get("binary"):
        codes = (rows >= 0).float()
    else:
        codes = round_to_grid(rows, params.scale.float()[:, None], params.zero_point.float()[:, None],
                              params.qmin, params.qmax)
    codes = from_rows(codes, tuple(weight.shape), params.granularity, params.axis).to(code_dtype(params.qmin, params.qmax))
    if not torch.equal(dequantize(codes, params), weight):
        return None
    return codes, params
