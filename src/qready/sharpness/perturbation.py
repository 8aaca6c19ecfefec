"""A parametrization that adds a perturbation ``ε`` to a module's *effective* weight.

Appended after a weight quantizer (``parametrize.register_parametrization`` chains), the module
computes with ``Q(w) + ε`` while the float weight ``w`` is never modified. Three states:

* **idle** (``eps is None``): identity, ``forward(q) = q`` (the same tensor, no copy);
* **probing** (the ascent pass): ``forward(q) = q + probe`` with ``probe`` a zero leaf tensor that
  requires grad, so after ``backward()`` ``probe.grad = ∂L/∂Q(w)`` exactly (accumulated when the
  module runs several times in one forward); the last ``q`` is kept as ``value`` (ASAM's ``|Q(w)|``);
* **perturbed** (the descent pass): ``forward(q) = q + ε`` with a fixed ``ε`` (no grad).

Nothing is saved in the state dict, so a model loads and saves the same with or without it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..quant.parametrized import remove_weight_parametrization


class Perturbation(nn.Module):
    """``q -> q + ε`` (see the module docstring for the idle / probing / perturbed states)."""

    def __init__(self) -> None:
        super().__init__()
        self.probing = False
        self.eps: Tensor | None = None
        self.value: Tensor | None = None

    def forward(self, q: Tensor) -> Tensor:
        if self.probing:
            if self.eps is None:
                self.eps = torch.zeros_like(q, requires_grad=True)
            self.value = q.detach()
            return q + self.eps
        return q if self.eps is None else q + self.eps

    def start_probe(self) -> None:
        """Enter the probing state (a fresh zero probe is made at the next forward)."""
        self.reset()
        self.probing = True

    @property
    def probe_grad(self) -> Tensor | None:
        """``∂L/∂Q(w)`` accumulated by the last probing pass (None when the module did not run)."""
        eps = self.eps
        return eps.grad if eps is not None and eps.requires_grad else None

    def set_eps(self, eps: Tensor) -> None:
        """Enter the perturbed state with ``ε`` (detached, same shape as the weight)."""
        self.probing = False
        self.eps = eps.detach()
        self.value = None

    def reset(self) -> None:
        """Back to the idle state (identity)."""
        self.probing = False
        self.eps = None
        self.value = None


def perturbations(model: nn.Module) -> list[Perturbation]:
    """Every :class:`Perturbation` parametrization in ``model`` (definition order)."""
    return [m for m in model.modules() if isinstance(m, Perturbation)]


def attach_perturbation(module: nn.Module) -> Perturbation:
    """The :class:`Perturbation` at the end of ``module.weight``'s parametrization chain (appended if
    missing). ``module.weight`` must already be parametrized (e.g. by a QAT weight quantizer)."""
    if not parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"{type(module).__name__}.weight is not parametrized: perturb the parameter itself")
    chain = module.parametrizations["weight"]
    found = [p for p in chain if isinstance(p, Perturbation)]
    if found:
        if chain[-1] is not found[0]:
            raise ValueError(f"{type(module).__name__}.weight: a parametrization was appended after the "
                             "Perturbation; it must stay last")
        return found[0]
    pert = Perturbation()
    parametrize.register_parametrization(module, "weight", pert)
    return pert


def detach_perturbation(module: nn.Module) -> bool:
    """Remove the :class:`Perturbation` from ``module.weight``'s chain; True when there was one."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    chain = module.parametrizations["weight"]
    for i, p in enumerate(chain):
        if isinstance(p, Perturbation):
            if len(chain) == 1:
                remove_weight_parametrization(module, leave_parametrized=False)
            else:
                del chain[i]
            return True
    return False
