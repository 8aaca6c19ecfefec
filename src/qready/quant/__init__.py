"""Quantization core: specs, fake quantization, integer codes, ranges, PTQ and module selection."""

from .activations import ActivationQuantizer, attach_input_quantizer, input_quantizers
from .functional import compute_qparams, dequantize, fake_quantize, quantize
from .ptq import check_finite_weights, ptq, recalibrate_batchnorm
from .select import Selector, SelectedModule, as_selector, is_depthwise
from .spec import GRANULARITIES, RANGE_METHODS, QuantParams, QuantSpec, check_bits

__all__ = [
    "GRANULARITIES",
    "RANGE_METHODS",
    "ActivationQuantizer",
    "QuantParams",
    "QuantSpec",
    "SelectedModule",
    "Selector",
    "as_selector",
    "attach_input_quantizer",
    "check_bits",
    "check_finite_weights",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "input_quantizers",
    "is_depthwise",
    "ptq",
    "quantize",
    "recalibrate_batchnorm",
]
