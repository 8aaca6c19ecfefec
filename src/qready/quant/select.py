"""Module selection shared by every method: which layers are quantized, regularized or palettized.

A :class:`Selector` picks modules by type and by name regexes, can skip depthwise convolutions, and
decides what happens to the first and last selected layer (quantized like the rest, kept in float, or
kept at a fixed higher bit width). "Which layers" therefore means the same thing in PTQ, QAT,
regularizers and palettization.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from .layers import is_weight_layer, registered_types

FirstLastPolicy = Literal["same", "float"] | int


@dataclass(frozen=True)
class SelectedModule:
    """One selected module and what precision policy applies to it.

    ``bits_override`` is ``None`` (use the method's bits), an int (use these bits) or ``"float"``
    (leave this module unquantized; such modules are *not* returned by :meth:`Selector.select`).
    """

    name: str
    module: nn.Module
    bits_override: int | None = None


def is_depthwise(module: nn.Module) -> bool:
    """True for a grouped convolution with one input channel per group (groups == in_channels > 1)."""
    groups = getattr(module, "groups", 1)
    in_ch = getattr(module, "in_channels", None)
    return isinstance(module, nn.modules.conv._ConvNd) and groups > 1 and groups == in_ch


@dataclass(frozen=True)
class Selector:
    """Which modules a method touches.

    Args:
        types: module classes to consider; ``None`` (default): every weight-bearing layer type of
            :mod:`qready.quant.layers` (Linear, Conv, ConvTranspose, Embedding, Hugging Face
            ``Conv1D`` and any type added with ``register_layer``). Embeddings are selected by default
            (per token row): in a small BERT they hold ~70 % of the weights and, down to 4 bits,
            quantizing them leaves top-1 agreement with the float model at >= 99.9 %; they do cost
            more output KL than the Linear layers at the same bit width (10-40x,
            ``benchmarks/embeddings.py``), so at 3 bits and below exclude them by name
            (``exclude=("embeddings",)``) to keep them in float.
        include: regexes; when given, a module's qualified name must match at least one (``re.search``).
        exclude: regexes; a module whose name matches any is skipped.
        skip_depthwise: skip depthwise convolutions (groups == in_channels).
        first_last: policy for the first and last candidate module (in ``named_modules`` order):
            ``"same"`` treats them like the rest, ``"float"`` leaves them unquantized, an int keeps them at
            that bit width (e.g. 8).
    """

    types: tuple[type[nn.Module], ...] | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_depthwise: bool = False
    first_last: FirstLastPolicy = "same"
    _compiled: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.types is not None:
            object.__setattr__(self, "types", tuple(self.types))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for t in self.types or ():
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise TypeError(f"Selector.types must hold nn.Module subclasses, got {t!r}")
        fl = self.first_last
        if not (fl in ("same", "float") or (isinstance(fl, int) and not isinstance(fl, bool) and 1 <= fl <= 16)):
            raise ValueError(f"Selector.first_last must be 'same', 'float' or an int bit width 1-16, got {fl!r}")
        try:
            compiled = (
                tuple(re.compile(p) for p in self.include),
                tuple(re.compile(p) for p in self.exclude),
            )
        except re.error as err:
            raise ValueError(f"Selector: invalid regex ({err})") from err
        object.__setattr__(self, "_compiled", compiled)

    def accepts_type(self, module: nn.Module) -> bool:
        """True when ``module``'s type passes the type filter."""
        return is_weight_layer(module) if self.types is None else isinstance(module, self.types)

    def type_names(self) -> list[str]:
        """Names of the accepted types (for messages)."""
        return registered_types() if self.types is None else [t.__name__ for t in self.types]

    def candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Modules that pass the type, name and depthwise filters, in definition order."""
        include, exclude = self._compiled
        out = []
        for name, mod in model.named_modules():
            if not self.accepts_type(mod) or getattr(mod, "weight", None) is None:
                continue
            if include and not any(p.search(name) for p in include):
                continue
            if any(p.search(name) for p in exclude):
                continue
            if self.skip_depthwise and is_depthwise(mod):
                continue
            out.append((name, mod))
        return out

    def select(self, model: nn.Module) -> list[SelectedModule]:
        """Selected modules with their bit-width override; modules kept in float are left out."""
        cands = self.candidates(model)
        edge = {cands[0][0], cands[-1][0]} if cands else set()
        out = []
        for name, mod in cands:
            override = None
            if name in edge and self.first_last != "same":
                if self.first_last == "float":
                    continue
                override = int(self.first_last)
            out.append(SelectedModule(name, mod, override))
        return out


def as_selector(select: Selector | dict | None) -> Selector:
    """Accept a Selector, a dict of its keyword arguments, or None (the default selector)."""
    if select is None:
        return Selector()
    if isinstance(select, Selector):
        return select
    if isinstance(select, dict):
        return Selector(**select)
    raise TypeError(f"select must be a Selector, a dict or None, got {type(select).__name__}")
