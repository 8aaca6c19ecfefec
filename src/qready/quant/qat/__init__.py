"""Quantization-aware training back-end: STE, LSQ and EWGS quantizers attached by parametrization."""

from .apply import (
    METHODS,
    calibrate_activation_quantizers,
    finalize,
    prepare_qat,
    qat_param_groups,
    quantizer_parameters,
)
from .hessian import EWGSDeltaUpdater, estimate_ewgs_deltas, hutchinson_trace

__all__ = [
    "METHODS",
    "calibrate_activation_quantizers",
    "EWGSDeltaUpdater",
    "estimate_ewgs_deltas",
    "finalize",
    "hutchinson_trace",
    "prepare_qat",
    "qat_param_groups",
    "quantizer_parameters",
]
