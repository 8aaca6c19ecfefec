"""The QAT methods by name: one registry, one class per method.

A method says how to build the weight quantizer of a layer and the quantizer of a layer's inputs, and
which weight granularity it uses by default; :func:`qready.quant.qat.prepare_qat` resolves ``method=``
through :data:`QAT_METHODS`. Adding a method is its quantizer classes plus one registered class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import Registry
from .quantizers import (
    ActivationQAT,
    EWGSActivationQuantizer,
    EWGSWeightQuantizer,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    STEActivationQuantizer,
    STEWeightQuantizer,
    WeightQuantizer,
)


@dataclass(frozen=True)
class QATOptions:
    """Options a method may read: ``range`` (STE ranges), ``momentum`` (STE activation ranges),
    ``delta`` (EWGS gradient scaling)."""

    range: str = "minmax"
    momentum: float = 0.1
    delta: float = 1e-3


class QATMethod:
    """Base class of a QAT method: quantizer factories and the default weight granularity."""

    default_granularity: ClassVar[str] = "channel"

    def weight_quantizer(self, weight: torch.Tensor, bits: int, granularity: str, axis: int,
                         options: QATOptions) -> WeightQuantizer:
        """The parametrization of ``weight`` (``axis``: its output-channel axis)."""
        raise NotImplementedError

    def activation_quantizer(self, bits: int, options: QATOptions) -> ActivationQAT:
        """The quantizer of a layer's inputs."""
        raise NotImplementedError


QAT_METHODS: Registry[QATMethod] = Registry("QAT method")


@QAT_METHODS.register("ste")
class STE(QATMethod):
    """Straight-through fake quantization with min-max/MSE/percentile ranges (moving averages for
    activations)."""

    def weight_quantizer(self, weight, bits, granularity, axis, options):
        return STEWeightQuantizer(weight, bits, granularity, range=options.range, axis=axis)

    def activation_quantizer(self, bits, options):
        return STEActivationQuantizer(bits, range=options.range, momentum=options.momentum)


@QAT_METHODS.register("lsq")
class LSQ(QATMethod):
    """Learned step size (Esser et al., 2020)."""

    def weight_quantizer(self, weight, bits, granularity, axis, options):
        return LSQWeightQuantizer(weight, bits, granularity, axis=axis)

    def activation_quantizer(self, bits, options):
        return LSQActivationQuantizer(bits)


@QAT_METHODS.register("ewgs")
class EWGS(QATMethod):
    """Learned bounds with element-wise gradient scaling (Lee et al., 2021); per-tensor weights as in
    the paper."""

    default_granularity: ClassVar[str] = "tensor"

    def weight_quantizer(self, weight, bits, granularity, axis, options):
        return EWGSWeightQuantizer(weight, bits, granularity, delta=options.delta, axis=axis)

    def activation_quantizer(self, bits, options):
        return EWGSActivationQuantizer(bits, delta=options.delta)
