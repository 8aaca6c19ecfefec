"""The PTQ method registry: ``ptq(..., method=NAME)``, recipes, the CLI and the sweep resolve names here.

A method is a small frozen dataclass (its options) registered under a name, with

* ``uses_calibration``: whether it needs each layer's input Hessian from calibration batches;
* ``quantize_layer(name, module, spec, stats)``: put ``module.weight`` on the grid of ``spec`` in place
  (``stats`` is the layer's :class:`~qready.quant.ptq.capture.LayerStats`, or ``None`` when none were
  captured, e.g. for an embedding).

Adding a method is one file: a dataclass decorated with ``@PTQ_METHODS.register("name")``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from torch import nn

from ...registry import Registry
from ..spec import QuantSpec
from .capture import LayerStats


class PTQMethod(Protocol):
    """What :func:`qready.ptq` needs from a method."""

    uses_calibration: bool

    def quantize_layer(self, name: str, module: nn.Module, spec: QuantSpec, stats: LayerStats | None) -> None: ...


PTQ_METHODS: Registry[PTQMethod] = Registry("PTQ method")


def build_method(method: str | PTQMethod, options: dict) -> PTQMethod:
    """The method object for ``method`` (a registered name built with ``options``, or an instance)."""
    if not isinstance(method, str):
        if options:
            raise ValueError(f"method options {sorted(options)} are only accepted with a method name")
        if not callable(getattr(method, "quantize_layer", None)):
            raise TypeError(f"method must be one of {PTQ_METHODS.names()} or a PTQ method object; got {method!r}")
        return method
    factory = PTQ_METHODS.get(method)
    try:
        return factory(**options)
    except TypeError as err:
        fields = [f.name for f in dataclasses.fields(factory)] if dataclasses.is_dataclass(factory) else []
        raise ValueError(f"unknown option for PTQ method {method!r} ({err}); its options: {fields}") from err
