"""Removing a weight parametrization from one module without touching its deep copies.

``torch.nn.utils.parametrize`` gives a parametrized module a generated class that holds the ``weight``
property; ``copy.deepcopy`` shares that class between the original and the copy, and
``remove_parametrizations`` deletes the property from the class -- breaking every other module of it.
:func:`remove_weight_parametrization` first gives the module a private copy of its class.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize


def remove_weight_parametrization(module: nn.Module, *, leave_parametrized: bool) -> None:
    """``parametrize.remove_parametrizations(module, "weight", ...)`` that leaves other modules sharing the
    module's generated class (its deep copies) intact."""
    cls = module.__class__
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=leave_parametrized)
