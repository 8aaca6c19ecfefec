"""Quantization-aware training back-end: STE, LSQ and EWGS quantizers attached by parametrization."""

from .apply import (
    calibrate_activation_quantizers,
    finalize,
    prepare_qat,
    qat_param_groups,
    quantizer_parameters,
)
from .hessian import EWGSDeltaUpdater, estimate_ewgs_deltas, hutchinson_trace
from .methods import QAT_METHODS, QATMethod, QATOptions

__all__ = [
    "QAT_METHODS",
    "QATMethod",
    "QATOptions",
    "calibrate_activation_quantizers",
    "EWGSDeltaUpdater",
    "estimate_ewgs_deltas",
    "finalize",
    "hutchinson_trace",
    "prepare_qat",
    "qat_param_groups",
    "quantizer_parameters",
]
