"""The regularizer protocol, registry and composition.

A regularizer is an ``nn.Module`` called as ``reg(model, loss=None)`` that returns a scalar tensor
already multiplied by its weight λ; add it to the task loss. Learnable regularizer parameters
(margins, temperatures, representatives) live in the regularizer, so give ``reg.parameters()`` to
the optimizer — :func:`qready.train.fit` does this for every loss term that is an ``nn.Module``.
The model's own modules are looked up by name on each call and are never registered inside the
regularizer, so ``reg.parameters()`` holds only the regularizer's own parameters.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..checks import check_float, check_int
from ..quant.select import Selector, as_selector
from ..registry import Registry

REGULARIZERS: Registry[Regularizer] = Registry("regularizer")
DEFAULT_WEIGHT = 0.01  # λ of every regularizer unless given: the R² paper's value in all its runs


def param_key(module_name: str) -> str:
    """A ParameterDict-safe key for a qualified module name (dots are not allowed in keys)."""
    return module_name.replace(".", "__") or "__root__"


class Regularizer(nn.Module):
    """Base class: subclasses implement :meth:`penalty`; calling returns ``weight * penalty``.

    Args:
        model: the model to regularize (used to find the selected layers once).
        weight: λ, the multiplier of the penalty.
        select: which layers (a :class:`~qready.quant.Selector` or its keyword arguments).
        start_epoch: the term is active from this epoch on (0-based; see :meth:`active`).
    Attributes:
        needs_graph: True when the penalty differentiates the task loss (it must be passed undetached).
    """

    needs_graph: bool = False

    def __init__(self, model: nn.Module, weight: float = DEFAULT_WEIGHT, select: Selector | dict | None = None,
                 start_epoch: int = 0) -> None:
        super().__init__()
        check_float("regularizer weight", weight, minimum=0.0)
        check_int("start_epoch", start_epoch, minimum=0)
        self.weight = float(weight)
        self.start_epoch = start_epoch
        self.selector = as_selector(select)
        self.layer_names: list[str] = [item.name for item in self.selector.select(model)]
        if not self.layer_names:
            raise ValueError(f"{type(self).__name__}: no layer of {type(model).__name__} matches the selector")

    def layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """The selected ``(name, module)`` pairs of ``model``."""
        for name in self.layer_names:
            yield name, model.get_submodule(name)

    def active(self, epoch: int) -> bool:
        """Whether the term applies in ``epoch`` (0-based)."""
        return epoch >= self.start_epoch

    def penalty(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        """The unweighted penalty, a scalar tensor."""
        raise NotImplementedError

    def forward(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * self.penalty(model, loss)


class Compose(nn.Module):
    """Sum of several regularizers, for users' own loops: ``Compose([r1, r2])(model, loss=loss)``."""

    def __init__(self, terms: list[Regularizer]) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.needs_graph = any(getattr(t, "needs_graph", False) for t in terms)

    def active(self, epoch: int) -> bool:
        return any(t.active(epoch) for t in self.terms)

    def forward(self, model: nn.Module, loss: torch.Tensor | None = None, epoch: int | None = None) -> torch.Tensor:
        total = None
        for term in self.terms:
            if epoch is not None and not term.active(epoch):
                continue
            value = term(model, loss=loss)
            total = value if total is None else total + value
        if total is None:
            return torch.zeros(())
        return total


def build(name: str, model: nn.Module, weight: float = DEFAULT_WEIGHT, select: Selector | dict | None = None,
          **options) -> Regularizer:
    """Build the regularizer registered as ``name`` (see :func:`list_regularizers`) for ``model``."""
    factory = REGULARIZERS.get(name)
    try:
        return factory(model, weight=weight, select=select, **options)
    except TypeError as err:
        raise ValueError(f"regularizer {name!r}: {err}") from None


def option_names(name: str) -> list[str]:
    """The keyword options of regularizer ``name`` beyond ``model``, ``weight`` and ``select``."""
    import inspect

    params = inspect.signature(REGULARIZERS.get(name)).parameters
    return [p for p in params if p not in ("self", "model", "weight", "select")]


def list_regularizers() -> list[str]:
    """Registered regularizer names."""
    return REGULARIZERS.names()
