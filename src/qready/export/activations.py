"""Describe a model's fixed activation quantizers as JSON and rebuild them on a fresh model.

A quantized model's activation quantizers hang off its modules (``<module>.input_quantizer``, a forward
pre-hook); a freshly built model has none, so their state-dict entries cannot be loaded into it.
:func:`activation_layout` records what each one is (JSON-serialisable); :func:`attach_activation_layout`
gives a fresh model the same quantizers, after which ``load_state_dict(strict=True)`` fills in their
scales/zero points (calibrated PTQ, finalized STE/LSQ) or bounds (finalized EWGS).

Layout: ``{module name: {"kind": "affine", "spec": {QuantSpec fields}}}`` or
``{module name: {"kind": "ewgs", "bits": b}}``.
"""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from ..quant.activations import ATTR, ActivationQuantizer, attach_input_module
from ..quant.qat.quantizers import ActivationQAT, EWGSActivationQuantizer
from ..quant.spec import QuantSpec


def activation_layout(model: nn.Module) -> dict[str, dict]:
    """``{module name: description}`` of every activation quantizer of ``model`` (see the module docstring).

    Raises:
        ValueError: a quantizer is still calibrating, or is a QAT quantizer that was not finalized
            (:func:`qready.finalize` fixes them).
    """
    layout: dict[str, dict] = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, ATTR, None)
        if quantizer is None:
            continue
        if isinstance(quantizer, ActivationQuantizer):
            if quantizer.observing:
                raise ValueError(f"the input quantizer of {name!r} is still calibrating: run calibration batches "
                                 "and finish_calibration() first (qready.ptq does)")
            layout[name] = {"kind": "affine", "spec": asdict(quantizer.spec)}
        elif isinstance(quantizer, EWGSActivationQuantizer) and quantizer.initialized:
            layout[name] = {"kind": "ewgs", "bits": quantizer.bits}
        elif isinstance(quantizer, ActivationQAT):
            raise ValueError(f"the input quantizer of {name!r} is a {type(quantizer).__name__} still in training: "
                             "finalize the model first (qready.finalize)")
        else:
            raise ValueError(f"the input quantizer of {name!r} is a {type(quantizer).__name__}, which cannot be "
                             "exported")
    return layout


def attach_activation_layout(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Give ``model`` (freshly built, in place) the activation quantizers described by ``layout``, with
    placeholder parameters to be overwritten by ``load_state_dict``; returns ``model``."""
    modules = dict(model.named_modules())
    for name, entry in layout.items():
        if name not in modules:
            raise ValueError(f"the activation quantizer of layer {name!r} has no such layer in "
                             f"{type(model).__name__}")
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind == "affine":
            quantizer: nn.Module = ActivationQuantizer(QuantSpec(**entry["spec"]))
            quantizer.observing = False
        elif kind == "ewgs":
            quantizer = EWGSActivationQuantizer(int(entry["bits"]))
            quantizer.initialized = True
            quantizer.requires_grad_(False)
        else:
            raise ValueError(f"the activation quantizer of layer {name!r} has kind {kind!r}; "
                             "expected 'affine' or 'ewgs'")
        attach_input_module(modules[name], quantizer)
    return model


__all__ = ["activation_layout", "attach_activation_layout"]
