"""Quantization-aware training: attach STE / LSQ / EWGS quantizers, train, then bake them in.

Lifecycle::

    qmodel = prepare_qat(model, method="lsq", w_bits=4, a_bits=4, calib=train_loader)
    fit(qmodel, train_loader, cfg, param_groups=qat_param_groups(qmodel, lr=1e-3))   # or any loop
    finalize(qmodel)                  # integer-grid weights, fixed activation quantizers

Weight quantizers are ``torch.nn.utils.parametrize`` parametrizations on each selected module's
``weight`` (the float weight lives on as ``parametrizations.weight.original``); activation quantizers
quantize the selected modules' *inputs* through a forward pre-hook (attribute ``input_quantizer``,
the mechanism PTQ uses). BatchNorm and biases stay float and trainable. Quantizers are ordinary
submodules, so ``state_dict``, ``deepcopy``, ``.to(device)`` and DDP work unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...checks import check_float, check_int
from ..activations import ATTR, attach_input_module
from ..calibrate import run_batches
from ..layers import out_axis, takes_index_inputs
from ..parametrized import remove_weight_parametrization
from ..select import SelectedModule, Selector, as_selector
from ..spec import ACT_BITS, RANGE_METHODS, WEIGHT_BITS, check_bits
from ..validate import check_finite
from .methods import QAT_METHODS, QATOptions
from .quantizers import ActivationQAT, QATQuantizer


def _check_options(method: str, w_bits: int | None, a_bits: int | None, first_last: object, w_granularity: str | None,
                   range: str, momentum: float, delta: float, calib_batches: int) -> None:
    QAT_METHODS.get(method)  # an unknown name raises, listing the registered methods
    if w_bits is None and a_bits is None:
        raise ValueError("w_bits and a_bits are both None: nothing to quantize")
    if w_bits is not None:
        check_bits(w_bits, "w_bits", WEIGHT_BITS)
    if a_bits is not None:
        check_bits(a_bits, "a_bits", ACT_BITS)
    if first_last is not None and first_last not in ("same", "float"):
        check_bits(first_last, "first_last (a bit width, or 'same'/'float')", WEIGHT_BITS)
    if w_granularity not in (None, "tensor", "channel"):
        raise ValueError(f"w_granularity must be None, 'tensor' or 'channel'; got {w_granularity!r}")
    if range not in RANGE_METHODS:
        raise ValueError(f"range must be one of {list(RANGE_METHODS)}; got {range!r}")
    check_float("momentum", momentum, minimum=0.0, maximum=1.0)
    check_float("delta", delta, minimum=0.0)
    check_int("calib_batches", calib_batches, minimum=1)


def _has_qat_weight(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, QATQuantizer) for p in module.parametrizations["weight"]
    )


def _check_modules(model: nn.Module, chosen: list[SelectedModule], selector: Selector, quantize_inputs: bool) -> None:
    if not chosen:
        raise ValueError(
            f"no module of {type(model).__name__} matches the selector "
            f"(types: {selector.type_names()}, first_last={selector.first_last!r}); nothing to quantize"
        )
    for item in chosen:
        weight = item.module.weight
        label = f"module {item.name!r} ({type(item.module).__name__})"
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() < 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(
                f"{label} cannot be quantized: QAT needs a floating-point weight with >= 2 dims "
                f"(Linear, Conv, Embedding), got {shape}; exclude it from the selector"
            )
        if _has_qat_weight(item.module):
            raise ValueError(f"{label} already has a QAT weight quantizer (prepare_qat was applied before)")
        if quantize_inputs and hasattr(item.module, ATTR):
            raise ValueError(f"{label} already has an input quantizer")


@contextmanager
def train_mode_kept(model: nn.Module) -> Iterator[None]:
    """Run the block in train mode, then restore the training mode and the model's own buffers
    (BatchNorm statistics; QAT quantizers' buffers are left as the block set them)."""
    kept = [b for m in model.modules() if not isinstance(m, QATQuantizer) for b in m.buffers(recurse=False)]
    saved = [b.detach().clone() for b in kept]
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, value in zip(kept, saved, strict=True):
                b.copy_(value)


def calibrate_activation_quantizers(model: nn.Module, quantizers: list[ActivationQAT], calib: Iterable, calib_batches: int) -> None:
    """Initialise activation quantizers on up to ``calib_batches`` batches.

    The batches run in train mode (BatchNorm normalises with batch statistics, as it will during QAT;
    a fresh model's running statistics would give eval-mode ranges far from the training ones), with
    no gradient, and every buffer is restored afterwards.
    """
    for q in quantizers:
        q.observing = True
    with train_mode_kept(model):
        seen = run_batches(model, calib, calib_batches)
    if seen == 0:
        raise ValueError("calib yielded no batches")
    for q in quantizers:
        q.finish_calibration()


def prepare_qat(
    model: nn.Module,
    method: str = "lsq",
    w_bits: int | None = 4,
    a_bits: int | None = None,
    select: Selector | dict | None = None,
    first_last: str | int | None = None,
    calib: Iterable | None = None,
    inplace: bool = False,
    *,
    w_granularity: str | None = None,
    range: str = "minmax",
    momentum: float = 0.1,
    delta: float = 1e-3,
    calib_batches: int = 8,
) -> nn.Module:
    """Attach quantization-aware-training quantizers to ``model``.

    Args:
        model: any ``nn.Module`` (trained, regularized, pretrained or fresh).
        method: ``"ste"`` (straight-through fake quant), ``"lsq"`` (learned step size) or ``"ewgs"``
            (learned bounds, element-wise gradient scaling); see :mod:`qready.quant.qat.quantizers`.
        w_bits: weight bits, 1-8 (None: weights stay float).
        a_bits: activation bits, 2-8 or 16, applied to the selected modules' inputs (None: float
            activations). Embedding inputs (indices) are never quantized.
        select: which modules (a :class:`Selector` or its keyword arguments); default every
            weight-bearing layer of :mod:`qready.quant.layers` (depthwise included), each quantized per
            channel along its own output-channel axis.
        first_last: overrides the selector's policy for the first and last selected module:
            ``"same"``, ``"float"`` (left unquantized) or a bit width 1-8 for both their weights and
            inputs (inputs at least 2 bits). None keeps the selector's own policy (default "same").
        calib: batches (any form of :mod:`qready.batching`) that initialise activation quantizers; without
            it each one initialises from the first batch it sees (pass ``calib`` under DDP so every
            rank starts equal). Weight quantizers initialise from the weights.
        inplace: modify ``model`` itself instead of returning a modified deep copy.
        w_granularity: ``"channel"`` or ``"tensor"`` weight steps/ranges; None: per channel for STE and
            LSQ, per tensor for EWGS (as in the paper).
        range: STE only: how ranges are chosen (``"minmax"``, ``"mse"``, ``"percentile"``).
        momentum: STE only: moving-average factor of activation ranges in training.
        delta: EWGS only: the initial gradient-scaling factor (see :class:`EWGSDeltaUpdater` to
            estimate it from the Hessian).
        calib_batches: at most this many batches of ``calib`` are used.
    Returns:
        the prepared model (``model`` itself when ``inplace``), in ``model``'s training mode.
    Raises:
        ValueError/TypeError naming the argument or module at fault, before anything is modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_options(method, w_bits, a_bits, first_last, w_granularity, range, momentum, delta, calib_batches)
    selector = as_selector(select)
    if first_last is not None:
        selector = replace(selector, first_last=first_last)
    chosen = selector.select(model)
    _check_modules(model, chosen, selector, a_bits is not None)
    check_finite(model)

    target = model if inplace else copy.deepcopy(model)
    qat_method = QAT_METHODS.build(method)
    granularity = w_granularity or qat_method.default_granularity
    options = QATOptions(range=range, momentum=momentum, delta=delta)
    parametrized: list[nn.Module] = []
    hooked: list[tuple[nn.Module, torch.utils.hooks.RemovableHandle]] = []
    shared: dict[int, nn.Module] = {}  # a tied weight (embedding and LM head) gets one quantizer
    try:
        for item in selector.select(target):
            module, weight = item.module, item.module.weight
            if w_bits is not None:
                if id(weight) not in shared:
                    shared[id(weight)] = qat_method.weight_quantizer(
                        weight, item.bits_override or w_bits, granularity, out_axis(module) or 0, options
                    ).to(weight.device, weight.dtype)
                parametrize.register_parametrization(module, "weight", shared[id(weight)])
                parametrized.append(module)
            if a_bits is not None and not takes_index_inputs(module):
                bits = max(item.bits_override, 2) if item.bits_override else a_bits
                aq = qat_method.activation_quantizer(bits, options).to(weight.device, weight.dtype)
                hooked.append((module, attach_input_module(module, aq)))
        if calib is not None and hooked:
            calibrate_activation_quantizers(target, [getattr(m, ATTR) for m, _ in hooked], calib, calib_batches)
    except BaseException:
        if inplace:
            _detach(parametrized, hooked)
        raise
    return target


def _detach(parametrized: list[nn.Module], hooked: list[tuple[nn.Module, torch.utils.hooks.RemovableHandle]]) -> None:
    """Undo a failed in-place :func:`prepare_qat` (the original weight tensors are restored)."""
    for module in parametrized:
        chain = module.parametrizations["weight"]
        if len(chain) > 1:  # keep the user's own parametrizations; ours has no right_inverse
            del chain[-1]
        else:
            remove_weight_parametrization(module, leave_parametrized=False)
    for module, handle in hooked:
        handle.remove()
        delattr(module, ATTR)


def qat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module carrying a QAT weight or input quantizer."""
    return [(name, m) for name, m in model.named_modules()
            if _has_qat_weight(m) or isinstance(getattr(m, ATTR, None), QATQuantizer)]


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of every QAT quantizer (steps, bounds), each once."""
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, QATQuantizer):
            for p in m.parameters(recurse=False):
                seen.setdefault(id(p), p)
    return list(seen.values())


def qat_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """The quantizer parameters as one optimizer group ``[{"params", "lr", "weight_decay", "name"}]``
    (``[]`` for STE, whose quantizers have no parameters).

    Pass it as ``fit(..., param_groups=...)``, or append it to your own optimizer's groups (and leave
    the quantizer parameters out of the model's group).
    """
    check_float("lr", lr, minimum=0.0, exclusive=True)
    check_float("weight_decay", weight_decay, minimum=0.0)
    if not qat_modules(model):
        raise ValueError(f"{type(model).__name__} has no QAT quantizers (prepare it with prepare_qat)")
    params = quantizer_parameters(model)
    if not params:  # STE quantizers learn nothing
        return []
    return [{"params": params, "lr": float(lr), "weight_decay": float(weight_decay), "name": "quantizers"}]


def finalize(model: nn.Module) -> nn.Module:
    """Bake the quantized weights in and fix the activation quantizers, in place; returns ``model``.

    Each QAT weight parametrization is removed with its current quantized value kept (every output
    channel then holds at most ``2^b`` distinct values). LSQ and STE input quantizers become PTQ
    :class:`~qready.quant.activations.ActivationQuantizer` s with the learned/averaged scale and zero
    point; EWGS input quantizers (whose grid need not contain 0) stay, with frozen bounds. The result
    computes exactly what the QAT model computes in eval mode.
    """
    modules = qat_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no QAT quantizers (prepare it with prepare_qat)")
    for name, m in modules:
        aq = getattr(m, ATTR, None)
        if isinstance(aq, ActivationQAT) and not aq.initialized:
            raise ValueError(f"the input quantizer of module {name!r} was never initialised: "
                             "run a batch through the model or pass calib= to prepare_qat")
    with torch.no_grad():
        for _, m in modules:
            if _has_qat_weight(m):
                remove_weight_parametrization(m, leave_parametrized=True)
            aq = getattr(m, ATTR, None)
            if isinstance(aq, ActivationQAT):
                setattr(m, ATTR, aq.finalized())
    return model
