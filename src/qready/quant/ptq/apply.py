"""Post-training quantization: weights onto the grid by a registered method (round to nearest, GPTQ),
optional bias correction, activations calibrated on a few batches."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from ...batching import batch_inputs, check_inputs_finite
from ..activations import attach_input_quantizer, input_quantizers
from ..calibrate import recalibrate_batchnorm, run_batches
from ..layers import takes_index_inputs
from ..select import SelectedModule, Selector, as_selector
from ..spec import WEIGHT_BITS, QuantSpec, check_bits
from ..validate import check_finite
from .bias_correction import bias_correction_target, correct_bias
from .capture import LayerStats, supports
from .methods import PTQMethod, build_method
from .params import record_params, recorded_params
from .passes import SequentialPasses, capture_stats, execution_blocks

log = logging.getLogger("qready.ptq")


def as_spec(spec: QuantSpec | int) -> QuantSpec:
    """A :class:`QuantSpec`, or an int bit width as shorthand for per-channel symmetric min-max."""
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return QuantSpec(bits=check_bits(spec, "spec (weight bits)", WEIGHT_BITS), granularity="channel")
    raise TypeError(f"spec must be a QuantSpec or an int bit width; got {type(spec).__name__}")


def calibration_inputs(calib: Iterable, max_batches: int) -> list:
    """The inputs of the first ``max_batches`` batches of ``calib`` (held, so every pass sees the same
    data); NaN/inf inputs are refused."""
    inputs = []
    for batch in calib:
        if len(inputs) >= max_batches:
            break
        x = batch_inputs(batch)
        check_inputs_finite(x, "ptq calibration")
        inputs.append(x)
    if not inputs:
        raise ValueError("calib yielded no batches")
    return inputs


@torch.no_grad()
def quantize_weights(model: nn.Module, chosen: list[SelectedModule], spec: QuantSpec, method: PTQMethod,
                     batches: list | None, *, bias_correction: bool | str = False, sequential: bool = True) -> None:
    """Quantize the chosen layers of ``model`` in place with ``method``.

    Methods that use calibration (and bias correction) read each layer's input statistics from
    ``batches``. ``sequential``: the layers are processed in forward order, each one's statistics
    coming from the model whose earlier layers are already quantized (schedule and memory bound in
    :mod:`qready.quant.ptq.passes`). Otherwise one pass over the float model captures every layer's.
    ``bias_correction``: ``False``, ``True``/``"layer"`` or ``"model"``
    (:mod:`qready.quant.ptq.bias_correction`); ``"model"`` takes one extra pass over the float model.
    """
    specs = {item.name: spec if item.bits_override is None else replace(spec, bits=item.bits_override)
             for item in chosen}
    modules = {item.name: item.module for item in chosen}
    target = bias_correction_target(bias_correction)
    needs_stats = method.uses_calibration or target is not None
    stat_layers = [(item.name, item.module) for item in chosen if supports(item.module)] if needs_stats else []

    done: set[str] = set()
    float_means: dict[str, torch.Tensor] = {}
    owners: dict[int, str] = {}  # id(weight) -> the layer that quantized it

    def finish(name: str, stats: LayerStats | None) -> None:
        module = modules[name]
        owner = owners.setdefault(id(module.weight), name)
        if owner != name:  # a tied weight (embedding and LM head) is quantized once, by the first of its layers
            log.debug("%s shares its weight with %s, already quantized", name, owner)
            params = recorded_params(modules[owner])
            if params is not None:  # a copy: exporters write each layer's parameters as tensors of their own
                record_params(module, copy.deepcopy(params))
            done.add(name)
            return
        original = module.weight.detach().clone() if target is not None and stats is not None else None
        method.quantize_layer(name, module, specs[name], stats)
        if original is not None:
            correct_bias(module, original, stats, float_means.get(name))
        done.add(name)

    stat_names = [name for name, _ in stat_layers]
    was_training = model.training
    model.eval()
    try:
        if stat_layers:
            containers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Sequential)]
            blocks, calls = execution_blocks(model, stat_layers, batches[0], watch=containers if sequential else [])
            # non-sequential: one pass over the float model, before anything is quantized
            stats = {} if sequential else capture_stats(model, stat_layers, batches, with_hessian=method.uses_calibration)
            if target == "model" and sequential:  # the float model's mean inputs, before anything is quantized
                float_stats = capture_stats(model, stat_layers, batches, with_hessian=False)
                float_means.update({name: layer_stats.mean() for name, layer_stats in float_stats.items()})
        # layers without statistics first, so that the layers after them see their quantized outputs
        for item in chosen:
            if item.name not in stat_names:
                finish(item.name, None)
        if stat_layers and sequential:
            SequentialPasses(stat_layers, method.uses_calibration, finish).run(model, batches, blocks, calls)
        elif stat_layers:
            for block in blocks:
                for name in block:
                    finish(name, stats.get(name))
    finally:
        model.train(was_training)
    missed = [name for name in stat_names if name not in done]
    if missed:
        log.warning("layers never called on the calibration batches, rounded without statistics: %s", missed)
        for name in missed:
            finish(name, None)


def ptq(
    model: nn.Module,
    spec: QuantSpec | int,
    calib: Iterable | None = None,
    act_spec: QuantSpec | None = None,
    select: Selector | dict | None = None,
    *,
    method: str | PTQMethod = "rtn",
    bias_correction: bool | str = False,
    sequential: bool = True,
    calib_batches: int = 8,
    bn_recalibrate: bool = False,
    **method_options,
) -> nn.Module:
    """Return a quantized copy of ``model``; ``model`` itself is not modified.

    Args:
        model: any ``nn.Module``; the selected modules' ``weight`` tensors are quantized.
        spec: weight quantizer, or an int bit width (per-channel symmetric min-max); per channel/group,
            each layer's output-channel axis comes from :mod:`qready.quant.layers` (``spec.axis`` is used
            for unregistered types).
        calib: iterable of batches (any form of :mod:`qready.batching`) used by calibrated methods
            (GPTQ), bias correction, activation ranges and, with ``bn_recalibrate``, BatchNorm statistics.
        act_spec: if given, each selected module's input is fake-quantized (per tensor, whatever the
            spec's granularity) with ranges
            calibrated on ``calib``. Use ``symmetric=False`` for post-ReLU activations.
        select: which modules (a :class:`Selector` or its keyword arguments); first/last layers can be
            kept in float or at a higher bit width.
        method: ``"rtn"`` (round to nearest, no calibration) or ``"gptq"`` (error-compensating, needs
            ``calib``), or a method object; see :data:`qready.quant.ptq.PTQ_METHODS`.
        bias_correction: after quantizing each layer, correct its mean output on ``calib`` through its
            bias (a zero bias is added to layers without one): ``True`` or ``"layer"`` removes the shift
            the layer's own quantization causes; ``"model"`` matches the float model's mean output,
            also removing the shift left by the quantized layers before it.
        sequential: calibrated methods see the inputs produced by the already-quantized earlier layers
            (one pass over ``calib`` per block of layers); ``False``: one pass on the float model.
        calib_batches: at most this many batches of ``calib`` are used (they are held in memory).
        bn_recalibrate: re-estimate BatchNorm statistics of the quantized model on ``calib``.
        **method_options: options of ``method`` (GPTQ: ``block_size``, ``damp``, ``act_order``).
    Returns:
        the quantized copy, in the training mode ``model`` had.
    """
    spec = as_spec(spec)
    if act_spec is not None and not isinstance(act_spec, QuantSpec):
        raise TypeError(f"act_spec must be a QuantSpec or None, got {type(act_spec).__name__}")
    if act_spec is not None and act_spec.granularity != "tensor":  # activations: one scale per tensor
        act_spec = replace(act_spec, granularity="tensor", group_size=None)
    quantizer = build_method(method, method_options)
    needs_stats = quantizer.uses_calibration or bias_correction_target(bias_correction) is not None
    if (act_spec is not None or bn_recalibrate or needs_stats) and calib is None:
        raise ValueError(f"method={method!r}, bias correction, activation quantization and BN re-estimation "
                         "need calibration batches: pass calib=")
    selector = as_selector(select)
    check_finite(model)
    if not selector.select(model):
        raise ValueError(
            f"no module of {type(model).__name__} matches the selector "
            f"(types: {selector.type_names()}); nothing to quantize"
        )

    batches = calibration_inputs(calib, calib_batches) if needs_stats else None
    qmodel = copy.deepcopy(model)
    chosen = selector.select(qmodel)
    start = time.perf_counter()
    quantize_weights(qmodel, chosen, spec, quantizer, batches, bias_correction=bias_correction, sequential=sequential)
    log.debug("quantized %d modules at %d bits with %s in %.2fs", len(chosen), spec.bits, quantizer,
              time.perf_counter() - start)
    if act_spec is not None:
        for item in chosen:
            if takes_index_inputs(item.module):
                continue  # integer inputs
            a_spec = act_spec if item.bits_override is None else replace(act_spec, bits=max(item.bits_override, 2))
            attach_input_quantizer(item.module, a_spec)
        was_training = qmodel.training
        qmodel.eval()
        seen = run_batches(qmodel, calib, calib_batches)
        if seen == 0:
            raise ValueError("calib yielded no batches")
        for quantizer_ in input_quantizers(qmodel):
            quantizer_.finish_calibration()
        qmodel.train(was_training)
    if bn_recalibrate:
        recalibrate_batchnorm(qmodel, calib, calib_batches)
    return qmodel
