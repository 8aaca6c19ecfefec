"""SAM and ASAM: sharpness-aware minimisation of full-precision weights.

As an optimizer wrapping any torch optimizer (two-step API or closure API)::

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)
    # two-step API
    loss_fn(model(x), y).backward()            # under DDP: inside model.no_sync()
    opt.first_step(zero_grad=True)             # w <- w + e,  e = rho * g / ||g||  (one global norm)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)            # w restored exactly, then the base optimizer steps
    # or the closure API (no_sync handled for a DDP `model`)
    def closure():                             # forward + backward, returns the loss
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)                   # both passes + the base step

or inside :func:`qready.train.fit` with the loop's own optimizer::

    fit(model, loader, cfg, step_strategy=SAMStep(rho=0.05))            # or RhoSchedule(0.05, 2)

``ASAM`` (adaptive) uses ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta``. BatchNorm policy
(see :mod:`qready.sharpness.twopass`): running statistics are updated by the first (ascent) pass
only; they are restored after the second pass when the optimizer knows the ``model`` (``SAMStep``
always does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..train import StepContext
from .ascent import RhoLike, check_adaptive, check_eta, check_rho_like, rho_at
from .twopass import ParamsTwoPass, loop_step


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around ``base_optimizer_cls(params, **base_kwargs)``.

    Args:
        params: parameters or parameter groups (as for any optimizer).
        base_optimizer_cls: the optimizer that takes the actual step (e.g. ``torch.optim.SGD``).
        rho: perturbation radius (settable later: ``opt.rho = ...``; 0 turns :meth:`step` into one
            plain pass).
        adaptive: ASAM's scale-invariant perturbation ``T^2 g / ||T g||``, ``T = |w| + eta``.
        eta: ASAM's offset.
        model: the model being trained (optional): its buffers (BN statistics) are kept from the
            first pass, and a DDP ``model`` runs the first pass of :meth:`step` under ``no_sync()``.
        **base_kwargs: passed to ``base_optimizer_cls`` (lr, momentum, weight_decay, ...).

    ``param_groups`` and ``state`` are the base optimizer's (schedulers work on either object);
    ``state_dict()`` is the base optimizer's.
    """

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, *, model: nn.Module | None = None,
                 **base_kwargs: Any) -> None:
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"base_optimizer_cls must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD); "
                            f"got {base_optimizer_cls!r}")
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._method = ParamsTwoPass(self._params, rho, adaptive, eta, model=model)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def rho(self) -> float:
        """The perturbation radius (settable, e.g. per epoch)."""
        return self._method.rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._method.rho = value

    @property
    def adaptive(self) -> bool:
        return self._method.adaptive

    def first_step(self, zero_grad: bool = False) -> float:
        """``w <- w + e`` from the current gradients (saving ``w``); returns ``||g||`` (``||T g||``)."""
        norm = self._method.perturb()
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return norm

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly (and the model's buffers), then take the base optimizer's step."""
        self._method.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """The whole update: ``closure`` (forward + backward, returns the loss) is called twice, the
        gradients zeroed before each call; returns the first (unperturbed) loss."""
        if closure is None:
            raise ValueError("SAM.step needs a closure (forward + backward, returning the loss); "
                             "or call first_step() / second_step() around your own passes")
        return self._method.step(torch.enable_grad()(closure), self.base_optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021): ``e = rho * T^2 g / ||T g||``, ``T = |w| + eta``.

    ``rho`` defaults to 0.5: the adaptive ball is measured in units of ``|w|``, so ASAM's radius is
    about ten times SAM's (the ASAM paper's CIFAR setting).
    """

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.5,
                 eta: float = 0.01, *, model: nn.Module | None = None, **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer_cls, rho=rho, adaptive=True, eta=eta, model=model, **base_kwargs)


class SAMStep:
    """Step strategy for :func:`qready.train.fit`: SAM/ASAM on every parameter of the loop's optimizer.

    ``rho`` is a number or a schedule ``epoch -> rho`` (e.g. :class:`~qready.sharpness.RhoSchedule`);
    ``rho = 0`` (warm-up) costs one pass. Logs ``rho``, ``grad_norm``, ``ascent_grad_norm`` and
    ``sharpness``. Under DDP the ascent pass keeps gradients per process (``ctx.no_sync()``).
    """

    def __init__(self, rho: RhoLike = 0.05, adaptive: bool = False, eta: float = 0.01) -> None:
        self.rho = check_rho_like(rho)
        self.adaptive = check_adaptive(adaptive)
        self.eta = check_eta(eta)

    def step(self, ctx: StepContext) -> Tensor:
        method = ParamsTwoPass(lambda: ctx.params, rho_at(self.rho, ctx.epoch), self.adaptive, self.eta,
                               model=ctx.model)
        return loop_step(method, ctx)
