"""Sharpness-aware training and quantization: SAM / ASAM, the SAQ step, BOPs and mixed precision.

* :class:`SAM`, :class:`ASAM` -- optimizer wrappers (two-step and closure APIs); :class:`SAMStep`
  for :func:`qready.train.fit`.
* :class:`SAQ` -- the sharpness-aware step of a quantized model (perturbs ``Q(w)``); :class:`SAQStep`
  for :func:`qready.train.fit`.
* :class:`RhoSchedule` -- ρ = 0 during a warm-up, then ρ; :func:`build_step` -- a step strategy
  from a recipe block such as ``{kind: saq, rho: 0.3}``.
* :func:`bops` -- bit operations per layer and in total.
* :func:`search_mixed_precision` -- per-layer bit widths under a BOPs budget (``search="sensitivity"``
  or ``"reinforce"``); :func:`prepare_mixed` / :func:`ptq_mixed` -- QAT (and SAQ) or weight-only PTQ
  of the mixed-precision model.
"""

from .ascent import RhoSchedule, ascent_direction
from .bops import BopsReport, LayerBops, bops, bops_from_macs, layer_macs
from .build import SHARPNESS_KINDS, SharpnessConfig, build_step
from .mixed import SEARCHES, MixedPrecisionResult, prepare_mixed, ptq_mixed, search_mixed_precision
from .perturbation import Perturbation
from .sam import ASAM, SAM, SAMStep
from .saq import SAQ, SAQStep
from .twopass import TwoPass

__all__ = [
    "ASAM",
    "SAM",
    "SAQ",
    "BopsReport",
    "LayerBops",
    "MixedPrecisionResult",
    "Perturbation",
    "RhoSchedule",
    "SAMStep",
    "SAQStep",
    "SEARCHES",
    "TwoPass",
    "ascent_direction",
    "bops",
    "bops_from_macs",
    "SHARPNESS_KINDS",
    "SharpnessConfig",
    "build_step",
    "layer_macs",
    "prepare_mixed",
    "ptq_mixed",
    "search_mixed_precision",
]
