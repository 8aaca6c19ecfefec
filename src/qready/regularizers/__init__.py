"""Regularizers that shape weights for quantization (range, gradient-l1, clustering)."""

from .base import (
           DEFAULT_WEIGHT,
           REGULARIZERS,
           Compose,
           Regularizer,
           build,
           list_regularizers,
           option_names,
           param_key,
)
from .cluster import ClusterRegularizer as ClusterRegularizer  # re-exported; registers cluster
from .gradient import GradL1 as GradL1  # re-exported; registers grad_l1
from .range import LInfRegularizer, MarginRegularizer, SoftMinMaxRegularizer  # registers the R² terms

__all__ = ["DEFAULT_WEIGHT", "REGULARIZERS", "option_names", "Compose", "LInfRegularizer", "MarginRegularizer", "Regularizer",
           "SoftMinMaxRegularizer", "build", "list_regularizers", "param_key"]
