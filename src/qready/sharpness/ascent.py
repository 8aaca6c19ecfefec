"""The maths shared by SAM, ASAM and SAQ: the ascent direction and the ρ schedule.

SAM (Foret et al., 2021): ``ε = ρ · g / ‖g‖₂``. ASAM (Kwon et al., 2021):
``ε = ρ · T² g / ‖T g‖₂`` with the element-wise ``T = |w| + η``. In both the 2-norm is ONE global
norm over every perturbed tensor (not one per tensor), so ``‖ε‖₂ = ρ`` (SAM) or ``‖T⁻¹ε‖₂ = ρ``
(ASAM) over the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_int


def check_rho(rho: object, name: str = "rho") -> float:
    """``rho`` as a float; raises ValueError unless it is a finite number >= 0."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {rho!r}")
    return float(rho)


def check_eta(eta: object) -> float:
    """``eta`` (ASAM's offset in ``T = |w| + η``) as a float; raises ValueError unless finite and >= 0."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0; got {eta!r}")
    return float(eta)


def check_adaptive(adaptive: object) -> bool:
    """``adaptive`` (SAM vs ASAM); raises ValueError unless it is a bool."""
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False; got {adaptive!r}")
    return adaptive


@torch.no_grad()
def ascent_direction(
    grads: Sequence[Tensor],
    rho: float,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    weights: Sequence[Tensor] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """The worst-case perturbation ``ε`` of each tensor (same shapes as ``grads``) and the global norm.

    SAM: ``ε_i = ρ g_i / ‖g‖`` with ``‖g‖`` the 2-norm of all gradients together. Adaptive (ASAM):
    ``ε_i = ρ T_i² g_i / ‖T g‖`` with ``T_i = |weights_i| + η`` (``weights`` required). A zero
    gradient gives ``ε = 0``. Returns ``(ε list, norm)`` where ``norm`` is ``‖g‖`` (or ``‖T g‖``), a
    0-dim tensor on the first gradient's device (NaN/Inf when a gradient is).
    """
    if not grads:
        raise ValueError("ascent_direction needs at least one gradient")
    if adaptive and (weights is None or len(weights) != len(grads)):
        raise ValueError("adaptive=True needs one weight tensor per gradient (T = |w| + eta)")
    scaled = [(w.abs() + eta) * g for w, g in zip(weights, grads, strict=True)] if adaptive else list(grads)
    device = grads[0].device
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s).to(device) for s in scaled]))
    factor = rho / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    if adaptive:
        eps = [(w.abs() + eta) * s * factor.to(s.device) for w, s in zip(weights, scaled, strict=True)]
    else:
        eps = [g * factor.to(g.device) for g in grads]
    return eps, norm


@dataclass(frozen=True)
class RhoSchedule:
    """ρ per epoch: ``0`` for the first ``warmup_epochs`` epochs (a plain one-pass step), then ``rho``.

    Pass it as ``rho=`` to :class:`~qready.sharpness.SAMStep` / :class:`~qready.sharpness.SAQStep`
    (they read the epoch from the step context, so a resumed run gets the right ρ), or set
    ``optimizer.rho = schedule(epoch)`` on a :class:`~qready.sharpness.SAM` in your own loop.
    """

    rho: float
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", check_rho(self.rho, "RhoSchedule.rho"))
        w = self.warmup_epochs
        check_int("RhoSchedule.warmup_epochs", w, minimum=0)

    def __call__(self, epoch: int) -> float:
        return 0.0 if epoch < self.warmup_epochs else self.rho


RhoLike = float | RhoSchedule | Callable[[int], float]


def rho_at(rho: RhoLike, epoch: int) -> float:
    """The ρ of ``epoch`` (0-based) from a number, a :class:`RhoSchedule` or any ``epoch -> rho``."""
    return check_rho(rho(epoch) if callable(rho) else rho)


def check_rho_like(rho: object) -> RhoLike:
    """Validate a strategy's ``rho`` argument (a number >= 0 or a callable ``epoch -> rho``)."""
    if callable(rho):
        return rho  # type: ignore[return-value]
    return check_rho(rho)
