"""Post-training quantization back-end: weights onto the grid from a trained model and a few batches.

Methods (:data:`PTQ_METHODS`): ``"rtn"`` (round to nearest) and ``"gptq"`` (error-compensating);
bias correction is an option of every method.
"""

from . import gptq, rtn  # noqa: F401  (registers the methods)
from .apply import as_spec, ptq
from .bias_correction import correct_bias
from .gptq import GPTQ, LutGrid, UniformGrid, gptq_matrix, layer_error
from .methods import PTQ_METHODS, PTQMethod, build_method
from .rtn import RTN, round_to_nearest

__all__ = ["GPTQ", "PTQ_METHODS", "RTN", "LutGrid", "PTQMethod", "UniformGrid", "as_spec", "build_method",
           "correct_bias", "gptq_matrix", "layer_error", "ptq", "round_to_nearest"]
