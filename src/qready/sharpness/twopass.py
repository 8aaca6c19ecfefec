"""The two-pass step shared by SAM, ASAM and SAQ (and their training-loop strategies).

One step::

    zero_grad
    ascent pass   forward + backward at w (or Q(w)); under DDP inside no_sync(): gradients stay per
                  process (m-sharpness, as in the SAM paper), no all-reduce
    perturb       ε from those gradients (one global norm); plain tensors: saved, then w += ε;
                  probed weights (Perturbation): the module computes with Q(w) + ε
    zero_grad
    descent pass  forward + backward at the perturbed point; under DDP the gradients are averaged
    restore       plain tensors copied back from the saved values (bit-exact, unlike w - ε), probes
                  back to identity, buffers restored
    optimizer.step()

BatchNorm policy: running statistics (and every other buffer of the model, e.g. STE activation
ranges) are updated only by the ascent pass, which sees the unperturbed weights; they are saved
after it and restored after the descent pass. With ``ρ = 0`` (e.g. a warm-up) the step is a single
plain pass and equals ordinary training exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..train import StepContext, distributed
from ..train.guards import NonFiniteError
from .ascent import ascent_direction, check_adaptive, check_eta, check_rho
from .perturbation import Perturbation

Closure = Callable[[], Tensor]


class TwoPass:
    """Base of the sharpness-aware methods: holds ρ/adaptive/η and runs ascent, perturb, restore.

    Subclasses say what is perturbed: :meth:`direct_targets` (tensors changed in place) and
    :meth:`probe_targets` (:class:`Perturbation` s on parametrized weights). ``model`` owns the
    buffers kept for the descent pass (None: no buffer policy); ``net`` is what the forward runs
    through (a DDP wrapper gets ``no_sync()`` in the ascent pass).
    """

    def __init__(self, rho: float, adaptive: bool = False, eta: float = 0.01, *, model: nn.Module | None = None,
                 net: nn.Module | None = None) -> None:
        self.rho = rho
        self.adaptive = check_adaptive(adaptive)
        self.eta = check_eta(eta)
        self.model = distributed.unwrap(model) if model is not None else None
        self.net = net if net is not None else model
        self._saved: list[tuple[Tensor, Tensor]] = []
        self._buffers: list[tuple[Tensor, Tensor]] = []
        self._perturbed = False
        self.last_norm: float | None = None
        self.last_perturbed_loss: Tensor | None = None

    @property
    def rho(self) -> float:
        """Radius of the perturbation (settable, e.g. per epoch; 0 makes :meth:`step` a plain step)."""
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = check_rho(value)

    def direct_targets(self) -> Sequence[Tensor]:
        """Tensors perturbed in place (their ``.grad`` is the ascent gradient)."""
        return ()

    def probe_targets(self) -> Sequence[Perturbation]:
        """Parametrized weights perturbed through their :class:`Perturbation`."""
        return ()

    # ------------------------------------------------------------------ the three phases

    @contextlib.contextmanager
    def ascent(self, no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> Iterator[None]:
        """Context for the ascent pass (forward + backward at the unperturbed point): probes on, and
        under DDP no gradient all-reduce (``no_sync``; default: ``net.no_sync()`` for a DDP ``net``)."""
        if self._perturbed:
            raise RuntimeError("ascent() while perturbed: call restore() first")
        probes = self.probe_targets()
        for p in probes:
            p.start_probe()
        sync_off = no_sync() if no_sync is not None else (
            distributed.no_sync(self.net) if self.net is not None else contextlib.nullcontext())
        try:
            with sync_off:
                yield
        except BaseException:
            for p in probes:
                p.reset()
            raise
        for p in probes:
            p.probing = False

    @torch.no_grad()
    def perturb(self) -> float:
        """Move to the worst-case point from the ascent gradients; returns the ascent gradient norm.

        Raises :class:`~qready.train.NonFiniteError` (nothing perturbed) when that norm is NaN/Inf on
        any process, and RuntimeError when no target has a gradient.
        """
        if self._perturbed:
            raise RuntimeError("perturb() called twice without restore()")
        direct = [t for t in self.direct_targets() if t.grad is not None]
        probes = [p for p in self.probe_targets() if p.probe_grad is not None]
        grads = [t.grad for t in direct] + [p.probe_grad for p in probes]
        if not grads:
            self._reset_probes()
            raise RuntimeError("no perturbed tensor has a gradient: run the ascent pass (forward + backward "
                               "inside ascent()) before perturb()")
        refs = [*direct, *(p.value for p in probes)] if self.adaptive else None
        eps, norm = ascent_direction(grads, self.rho, adaptive=self.adaptive, eta=self.eta, weights=refs)
        value = float(norm)
        finite = bool(torch.isfinite(norm))
        if not distributed.all_agree(finite, norm.device):
            self._reset_probes()
            raise NonFiniteError(f"ascent gradient norm is {value}" if not finite
                                 else "the ascent gradient is non-finite on another process")
        for t, e in zip(direct, eps[:len(direct)], strict=True):
            self._saved.append((t, t.detach().clone()))
            t.add_(e)
        for p in self.probe_targets():
            if p.eps is not None and p.eps.requires_grad and p.probe_grad is None:
                p.reset()  # ran in the ascent pass but received no gradient: left unperturbed
        for p, e in zip(probes, eps[len(direct):], strict=True):
            p.set_eps(e)
        if self.model is not None:
            self._buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self._perturbed = True
        self.last_norm = value
        return value

    @torch.no_grad()
    def restore(self) -> None:
        """Undo :meth:`perturb` exactly (saved values copied back, probes to identity, buffers
        restored). Safe to call when nothing is perturbed."""
        for t, saved in self._saved:
            t.copy_(saved)
        for b, saved in self._buffers:
            b.copy_(saved)
        self._saved.clear()
        self._buffers.clear()
        self._reset_probes()
        self._perturbed = False

    def _reset_probes(self) -> None:
        for p in self.probe_targets():
            p.reset()

    # ------------------------------------------------------------------ one whole step

    def step(
        self,
        closure: Closure,
        optimizer: torch.optim.Optimizer,
        *,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        before_update: Callable[[], object] | None = None,
    ) -> Tensor:
        """One sharpness-aware update; returns the loss at the unperturbed point (detached).

        ``closure()`` runs forward + backward and returns the loss; it is called twice (once when
        ``ρ = 0``) with the gradients zeroed (``optimizer.zero_grad``) before each call. The loss at
        the perturbed point is kept in ``last_perturbed_loss`` (None when ``ρ = 0``).
        ``before_update()`` runs after the restore and before ``optimizer.step()`` (e.g. gradient
        clipping). Whatever raises leaves the weights as they were.
        """
        optimizer.zero_grad(set_to_none=True)
        self.last_perturbed_loss = None
        if self.rho == 0:
            loss = closure()
        else:
            try:
                with self.ascent(no_sync):
                    loss = closure()
                self.perturb()
                optimizer.zero_grad(set_to_none=True)
                self.last_perturbed_loss = closure().detach()
            finally:
                self.restore()
        if before_update is not None:
            before_update()
        optimizer.step()
        return loss.detach()


def loop_step(method: TwoPass, ctx: StepContext) -> Tensor:
    """Run ``method``'s two-pass update inside :func:`qready.train.fit` (a step strategy's body).

    The ascent pass runs under ``ctx.no_sync()``; the gradients are clipped (``ctx.clip_gradients``)
    after the restore. Logs ``grad_norm`` and ``rho``, and when ρ > 0 ``ascent_grad_norm`` and
    ``sharpness`` (loss at the perturbed point minus the loss at the unperturbed one). Returns the
    loss at the unperturbed point.
    """

    def closure() -> Tensor:
        total, _ = ctx.compute_loss()
        total.backward()
        return total

    loss = method.step(closure, ctx.optimizer, no_sync=ctx.no_sync,
                       before_update=lambda: ctx.log("grad_norm", ctx.clip_gradients()))
    ctx.log("rho", method.rho)
    if method.last_perturbed_loss is not None and method.last_norm is not None:
        ctx.log("ascent_grad_norm", method.last_norm)
        ctx.log("sharpness", method.last_perturbed_loss - loss)
    return loss


class ParamsTwoPass(TwoPass):
    """SAM/ASAM on plain parameters (every one that has a gradient), perturbed in place."""

    def __init__(self, params: Callable[[], Sequence[Tensor]], rho: float, adaptive: bool = False, eta: float = 0.01,
                 *, model: nn.Module | None = None, net: nn.Module | None = None) -> None:
        super().__init__(rho, adaptive, eta, model=model, net=net)
        self._params = params

    def direct_targets(self) -> Sequence[Tensor]:
        return self._params()
