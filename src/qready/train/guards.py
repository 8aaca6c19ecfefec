"""Guards against NaN/Inf in losses, gradients and weights."""

from __future__ import annotations

from ..quant.validate import check_finite, first_nonfinite

__all__ = ["NonFiniteError", "check_finite", "first_nonfinite"]


class NonFiniteError(FloatingPointError):
    """A training step produced a NaN/Inf loss or gradient, or the weights became non-finite."""
