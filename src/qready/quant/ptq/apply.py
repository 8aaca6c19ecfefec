"""Post-training quantization: weights rounded onto the grid, activations calibrated on a few batches."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from ..activations import attach_input_quantizer, input_quantizers
from ..calibrate import recalibrate_batchnorm, run_batches
from ..functional import fake_quantize
from ..select import Selector, as_selector
from ..spec import QuantSpec
from ..validate import check_finite

log = logging.getLogger("qready.ptq")


def ptq(
    model: nn.Module,
    spec: QuantSpec,
    calib: Iterable | None = None,
    act_spec: QuantSpec | None = None,
    select: Selector | dict | None = None,
    *,
    calib_batches: int = 8,
    bn_recalibrate: bool = False,
) -> nn.Module:
    """Return a quantized copy of ``model``; ``model`` itself is not modified.

    Args:
        model: any ``nn.Module``; the selected modules' ``weight`` tensors are quantized.
        spec: weight quantizer.
        calib: iterable of batches (tensors or ``(x, y)``) used to calibrate activation ranges and,
            with ``bn_recalibrate``, BatchNorm statistics.
        act_spec: if given, each selected module's input is fake-quantized (per tensor) with ranges
            calibrated on ``calib``. Use ``symmetric=False`` for post-ReLU activations.
        select: which modules (a :class:`Selector` or its keyword arguments); first/last layers can be
            kept in float or at a higher bit width.
        calib_batches: at most this many batches of ``calib`` are used.
        bn_recalibrate: re-estimate BatchNorm statistics of the quantized model on ``calib``.
    Returns:
        the quantized copy, in the training mode ``model`` had.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if act_spec is not None and not isinstance(act_spec, QuantSpec):
        raise TypeError(f"act_spec must be a QuantSpec or None, got {type(act_spec).__name__}")
    if (act_spec is not None or bn_recalibrate) and calib is None:
        raise ValueError("activation quantization and BN re-estimation need calibration batches: pass calib=")
    selector = as_selector(select)
    check_finite(model)
    if not selector.select(model):
        raise ValueError(
            f"no module of {type(model).__name__} matches the selector "
            f"(types: {[t.__name__ for t in selector.types]}); nothing to quantize"
        )

    qmodel = copy.deepcopy(model)
    chosen = selector.select(qmodel)
    with torch.no_grad():
        for item in chosen:
            layer_spec = spec if item.bits_override is None else replace(spec, bits=item.bits_override)
            weight = item.module.weight
            weight.copy_(fake_quantize(weight, layer_spec))
    if act_spec is not None:
        for item in chosen:
            if isinstance(item.module, nn.Embedding):
                continue  # integer inputs
            a_spec = act_spec if item.bits_override is None else replace(act_spec, bits=max(item.bits_override, 2))
            attach_input_quantizer(item.module, a_spec)
        was_training = qmodel.training
        qmodel.eval()
        seen = run_batches(qmodel, calib, calib_batches)
        if seen == 0:
            raise ValueError("calib yielded no batches")
        for quantizer in input_quantizers(qmodel):
            quantizer.finish_calibration()
        qmodel.train(was_training)
    if bn_recalibrate:
        recalibrate_batchnorm(qmodel, calib, calib_batches)
    log.debug("quantized %d modules at %d bits", len(chosen), spec.bits)
    return qmodel
