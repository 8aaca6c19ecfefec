"""Quantization core: specs, fake quantization, integer codes, ranges, PTQ and module selection."""

from .activations import ActivationQuantizer, attach_input_quantizer, input_quantizers
from .functional import compute_qparams, dequantize, fake_quantize, quantize
from .ptq import ptq, recalibrate_batchnorm
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
]

# palettization (k-means, DKM, LUTs)
from .codebook import Palette, find_palette, nearest, snap  # noqa: E402
from .dkm import DKMWeight, dkm_naive, dkm_unique  # noqa: E402
from .kmeans import kmeans1d  # noqa: E402
from .palettize import finalize_palettized, palettize  # noqa: E402

__all__ += ["DKMWeight", "Palette", "dkm_naive", "dkm_unique", "finalize_palettized", "find_palette", "kmeans1d",
            "nearest", "palettize", "snap"]

from .activations import attach_input_module  # noqa: E402
from .hessian import EWGSDeltaUpdater, estimate_ewgs_deltas, hutchinson_trace  # noqa: E402
from .qat import METHODS as QAT_METHODS  # noqa: E402
from .qat import finalize, prepare_qat, qat_param_groups, quantizer_parameters  # noqa: E402

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
