"""Quantization: the shared core (specs, fake quantization, integer codes, ranges, module selection,
calibration passes) and one package per back-end: ``ptq``, ``qat``, ``palettize``."""

from .activations import ActivationQuantizer, attach_input_quantizer, input_quantizers
from .calibrate import recalibrate_batchnorm, run_batches
from .functional import compute_qparams, dequantize, fake_quantize, quantize
from .layers import register_layer
from .ptq import ptq
from .select import SelectedModule, Selector, as_selector, is_depthwise
from .spec import GRANULARITIES, RANGE_METHODS, QuantParams, QuantSpec, check_bits
from .validate import check_finite

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
    "check_finite",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "input_quantizers",
    "is_depthwise",
    "ptq",
    "quantize",
    "recalibrate_batchnorm",
    "register_layer",
    "run_batches",
]

# palettization (k-means, DKM, LUTs)
from .palettize import (  # noqa: E402
    DKMWeight,
    Palette,
    dkm_naive,
    dkm_unique,
    finalize_palettized,
    find_palette,
    kmeans1d,
    nearest,
    palettize,
    snap,
)

__all__ += ["DKMWeight", "Palette", "dkm_naive", "dkm_unique", "finalize_palettized", "find_palette", "kmeans1d",
            "nearest", "palettize", "snap"]

from .activations import attach_input_module  # noqa: E402
from .qat import (  # noqa: E402
    QAT_METHODS,
    EWGSDeltaUpdater,
    estimate_ewgs_deltas,
    finalize,
    hutchinson_trace,
    prepare_qat,
    qat_param_groups,
    quantizer_parameters,
)

__all__ += [
    "QAT_METHODS",
    "EWGSDeltaUpdater",
    "attach_input_module",
    "estimate_ewgs_deltas",
    "finalize",
    "hutchinson_trace",
    "prepare_qat",
    "qat_param_groups",
    "quantizer_parameters",
]
