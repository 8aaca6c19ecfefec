"""Regularizers that shape weights for quantization (range, gradient-l1, clustering)."""

from .base import REGULARIZERS, Compose, Regularizer, build, list_regularizers, param_key

__all__ = ["REGULARIZERS", "Compose", "Regularizer", "build", "list_regularizers", "param_key"]
