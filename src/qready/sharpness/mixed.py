"""Mixed precision under a BOPs budget: per-layer bit widths, then QAT/SAQ (or PTQ) of the mixed model.

Objective: minimise ``J(c) = L_SA(c) + λ·(BOPs(c)/T − 1)²`` over configurations ``c`` (one bit width
per layer from ``bits``, for its weights and, per ``a_bits``, its input activations) with
``BOPs(c) <= T``, where ``L_SA(c)`` is the sharpness-aware loss of the model quantized with ``c``:
``L(Q_c(w) + ε̂)``, ``ε̂ = ρ·g/‖g‖`` from the gradient with respect to the quantized weights, averaged
over a few batches. ``L`` is the cross-entropy with the labels (``loss="ce"``) or, label-free, the KL
divergence from the float model's own outputs (``loss="kl"``).

Two search methods (the registry :data:`SEARCHES`):

* ``"sensitivity"`` (:mod:`.search_sensitivity`): per-layer sensitivities on PTQ views and an exact
  dynamic programme under the budget -- cheap, but it assumes the layers' losses add up;
* ``"reinforce"`` (:mod:`.search_reinforce`): a bit-width policy trained with REINFORCE over a
  weight-sharing supernet (:mod:`.supernet`, :mod:`.policy`), reward ``−L_SA − λ·(BOPs/T − 1)²``.

Then :func:`prepare_mixed` attaches QAT quantizers per bit group for fine-tuning (e.g. with
:class:`~qready.sharpness.SAQStep`), or :func:`ptq_mixed` quantizes the weights post-training.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from ..batching import batch_inputs, batch_targets, forward, model_device, move_inputs, output_tensor
from ..checks import check_choice, check_float, check_int
from ..quant.activations import ATTR
from ..quant.ptq import ptq
from ..quant.qat import calibrate_activation_quantizers, prepare_qat
from ..quant.qat.quantizers import ActivationQAT
from ..quant.select import Selector, as_selector
from ..quant.spec import QuantSpec
from . import search_reinforce, search_sensitivity  # noqa: F401  (register the search methods)
from .ascent import check_rho
from .bops import LAYER_TYPES, ShapeOrBatch, layer_macs
from .search import (
    OBJECTIVES,
    SEARCHES,
    ActBits,
    MixedPrecisionResult,
    SearchProblem,
    act_bits,
    check_act,
    config_bops,
    cross_entropy,
    exact_names,
    kl_to_teacher,
    sharpness_loss,
)

__all__ = ["SEARCHES", "MixedPrecisionResult", "config_bops", "prepare_mixed", "ptq_mixed", "search_mixed_precision",
           "sharpness_loss"]


@torch.no_grad()
def _search_data(model: nn.Module, calib: Iterable, batches: int, loss: str) -> list[tuple]:
    """Up to ``batches`` batches as ``(inputs, target)`` on the model's device; the target is the label
    tensor (``"ce"``) or the float model's eval-mode logits (``"kl"``)."""
    device, data = model_device(model), []
    was_training = model.training
    model.eval()
    try:
        for batch in calib:
            if len(data) >= batches:
                break
            inputs = move_inputs(batch_inputs(batch), device)
            if loss == "ce":
                target = batch_targets(batch, "search_mixed_precision(loss='ce')").to(device)
            else:
                target = output_tensor(forward(model, inputs)).detach()
            data.append((inputs, target))
    finally:
        model.train(was_training)
    if not data:
        raise ValueError("calib yielded no batches")
    return data


def search_mixed_precision(
    model: nn.Module,
    calib: Iterable,
    input_shape: ShapeOrBatch,
    target_bops: float,
    *,
    search: str = "sensitivity",
    bits: Sequence[int] = (2, 3, 4, 5),
    a_bits: ActBits = "same",
    select: Selector | dict | None = None,
    rho: float = 0.05,
    adaptive: bool = False,
    lam: float = 1.0,
    batches: int = 4,
    loss: str = "ce",
    **options,
) -> MixedPrecisionResult:
    """Per-layer bit widths from ``bits`` with ``BOPs <= target_bops`` minimising the sharpness-aware
    loss plus ``lam · (BOPs/T − 1)²`` (see the module docstring for the methods).

    Args:
        model: the float model (not modified).
        calib: batches (any form of :mod:`qready.batching`; labelled for ``loss="ce"``); the first
            ``batches`` calibrate the quantizers and measure every loss.
        input_shape: one sample's shape (no batch dim), or an example batch (e.g. a dict of model
            keyword arguments), for the MACs (see :func:`~.bops.layer_macs`).
        target_bops: the budget ``T`` (e.g. ``bops(model, shape, 3, 3).total`` restricted to the layers).
        search: ``"sensitivity"`` or ``"reinforce"``; ``options`` go to that method
            (:func:`~.search_sensitivity.sensitivity_search`: ``candidates``, ``w_range``, ``a_range``,
            ``granularity``, ``resolution``; :func:`~.search_reinforce.reinforce_search`: ``policy``,
            ``hidden``, ``steps``, ``samples``, ``lr``, ``entropy``, ``momentum``, ``final``, ``seed``,
            ``method``, ``range_method``, ``granularity``).
        bits: candidate bit widths per layer (weights; 1-8).
        a_bits: ``"same"`` (a layer's input activations get its weight bits, at least 2), an int (every
            searched layer's inputs at that width) or None (float activations, counted as 32 bits).
        select: which layers (a :class:`~qready.quant.Selector`; default every Conv/Linear); layers
            the selector pins (``first_last=8``) keep that width and count in the budget; layers it
            leaves in float are not in the configuration.
        rho, adaptive: the ascent of the sharpness-aware loss (``rho=0``: plain quantized loss).
        lam: weight λ of the budget penalty ``(BOPs/T − 1)²`` (β in the REINFORCE reward).
        batches: number of batches used for calibration and every loss measurement.
        loss: ``"ce"`` (cross-entropy with the labels) or ``"kl"`` (label-free: KL divergence from the
            float model's outputs).
    Returns:
        a :class:`MixedPrecisionResult` whose ``config`` satisfies ``bops <= target_bops``.
    """
    method = SEARCHES.get(search)
    bits = sorted({int(b) for b in bits})
    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise ValueError(f"bits must be a non-empty sequence of weight bit widths 1-8; got {bits!r}")
    check_act(a_bits)
    rho = check_rho(rho)
    check_float("target_bops", target_bops, minimum=0.0, exclusive=True)
    check_int("batches", batches, minimum=1)
    check_float("lam", lam, minimum=0.0)
    check_choice("loss", loss, OBJECTIVES)
    selector = as_selector(select) if select is not None else Selector(types=LAYER_TYPES)
    data = _search_data(model, calib, batches, loss)

    macs = layer_macs(model, input_shape)
    chosen = selector.select(model)
    no_macs = [item.name for item in chosen if item.name not in macs]
    if no_macs:
        raise ValueError(f"selected layers {no_macs} have no MACs (not Conv/Linear, or not run by the forward); "
                         "exclude them from select")
    fixed = {item.name: item.bits_override for item in chosen if item.bits_override is not None}
    free = [item.name for item in chosen if item.bits_override is None]
    if not free:
        raise ValueError("the selector leaves no layer to search (all are pinned or float)")
    problem = SearchProblem(model=model, selector=selector, data=data,
                            criterion=cross_entropy if loss == "ce" else kl_to_teacher, macs=macs,
                            layers=[item.name for item in chosen], free=free, fixed=fixed, bits=bits, a_bits=a_bits,
                            target=float(target_bops), lam=float(lam), rho=rho, adaptive=adaptive)
    cheapest = problem.full(dict.fromkeys(free, bits[0]))
    if problem.bops(cheapest) > target_bops:
        raise ValueError(f"target_bops={target_bops:.4g} is below the cheapest configuration "
                         f"({problem.bops(cheapest):.4g} BOPs: every searched layer at {bits[0]} bits)")
    start = time.perf_counter()
    result = method(problem, **options)
    result.seconds = time.perf_counter() - start
    assert result.bops <= target_bops, (result.bops, target_bops)
    return result


def _check_config(model: nn.Module, config: Mapping[str, int]) -> None:
    if not config:
        raise ValueError("config is empty: nothing to quantize")
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"config names modules that {type(model).__name__} does not have: {unknown}")


def ptq_mixed(model: nn.Module, config: Mapping[str, int], spec: QuantSpec | None = None, calib: Iterable | None = None,
              **ptq_options) -> nn.Module:
    """Weight-only post-training quantization with per-layer bit widths: a quantized copy of ``model``
    whose layer ``n`` has its weights on the ``config[n]``-bit grid of ``spec`` (default: symmetric,
    per channel, MSE range -- the STE quantizer with ``range="mse"``). Layers not in ``config`` stay
    float. One :func:`~qready.quant.ptq` pass per bit width, each on the layers that have it (so
    ``calib`` and ``ptq_options`` such as ``method="gptq"`` apply group by group, later groups seeing the
    earlier ones quantized)."""
    _check_config(model, config)
    spec = spec or QuantSpec(bits=8, granularity="channel", range="mse")
    out = model
    for b in sorted(set(config.values())):
        group = sorted(n for n, v in config.items() if v == b)
        out = ptq(out, replace(spec, bits=b), calib, select=Selector(include=exact_names(group)), **ptq_options)
    return out


def prepare_mixed(
    model: nn.Module,
    config: Mapping[str, int],
    method: str = "lsq",
    a_bits: ActBits = "same",
    calib: Iterable | None = None,
    inplace: bool = False,
    *,
    calib_batches: int = 8,
    **qat_options,
) -> nn.Module:
    """QAT quantizers with per-layer bit widths: ``prepare_qat`` once per bit width, each time on the
    layers of ``config`` that have it (exact-name selector, in place on one copy), then one joint
    calibration of every input quantizer on ``calib`` (as a single ``prepare_qat`` call does, so a
    uniform ``config`` gives exactly the model ``prepare_qat`` gives).

    ``a_bits``: as in :func:`search_mixed_precision` (``"same"``: each layer's inputs at its weight
    bits, at least 2). ``qat_options`` go to every ``prepare_qat`` call (e.g. ``w_granularity``).
    Layers not in ``config`` stay float. Returns the prepared model (``model`` itself when ``inplace``).
    """
    check_act(a_bits)
    _check_config(model, config)
    target = model if inplace else copy.deepcopy(model)
    for b in sorted(set(config.values())):
        group = sorted(n for n, v in config.items() if v == b)
        prepare_qat(target, method=method, w_bits=b, a_bits=act_bits(a_bits, b), select=Selector(include=exact_names(group)),
                    inplace=True, **qat_options)
    quantizers = [q for n in config if isinstance(q := getattr(target.get_submodule(n), ATTR, None), ActivationQAT)]
    if calib is not None and quantizers:
        calibrate_activation_quantizers(target, quantizers, calib, calib_batches)
    return target
