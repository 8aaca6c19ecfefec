"""Finite-difference mode of gradient-ℓ1: the penalty's gradient from one extra forward + backward.

With ``g = ∇_W L`` (the step's own gradient) and ``s = sign(g)``, the gradient of ``‖g‖₁`` is a
Hessian-vector product, obtained by a forward difference::

    ∇_θ ‖∇_W L‖₁ = H_{θW} · s ≈ (∇_θ L(W + ε·s) − ∇_θ L(W)) / ε

for every parameter ``θ``. The activation term is the same with the selected activations ``a``
perturbed by ``ε·sign(∇_a L)`` (forward hooks, in the same extra pass). Several terms and weights
share the one pass: the direction is ``v = Σ_l (c_l/κ)·s_l`` with ``c_l`` the coefficient of tensor
``l`` (λ_w or λ_a, divided by the element count with ``normalize="numel"``) and ``κ = max_l c_l``;
the penalty gradient is ``κ·(∇L(x + ε·v) − g)/ε``, added to ``g`` before the optimizer step. No graph
of the gradient is built (no double backprop).

Step size: ``ε = r·(1 + ‖W‖₂)/√N`` over the ``N`` selected weights, the usual choice for a
difference along a ±1 vector (about ``r`` times the RMS weight, never 0). ``r = √(machine ε)``
(3.5e-4 in float32) balances the forward difference's truncation error (``∝ ε``) against rounding
(``∝ machine ε/ε``); the central difference ``(∇L(x + ε·v) − ∇L(x − ε·v))/2ε`` (``central=True``,
a second extra pass) has truncation ``∝ ε²`` and uses ``r = ∛(machine ε)``.

The extra passes use the same batch, BatchNorm in train mode (batch statistics, as in the first pass),
and the random-number state of the first pass (identical dropout masks); every buffer of the model
(BatchNorm running statistics, counters) is restored afterwards, so only the first pass updates them.
Under DDP both passes run synchronised: the sign comes from the averaged gradient and the extra
pass's gradients are averaged like the first pass's, which is exactly the single-process
computation on the global batch; no ``no_sync`` is needed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..train import StepContext
    from .gradient import GradL1

Closure = Callable[[], Tensor]


def relative_step(dtype: torch.dtype, central: bool) -> float:
    """Default relative step ``r``: ``√(machine ε)`` (forward) or ``∛(machine ε)`` (central) of ``dtype``."""
    eps = torch.finfo(dtype).eps
    return eps ** (1 / 3) if central else math.sqrt(eps)


def step_size(weights: Sequence[Tensor], relative: float) -> float:
    """``ε = relative·(1 + ‖W‖₂)/√N`` over the concatenated ``weights`` (``N`` elements)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.detach(), dtype=torch.float64)
                                                 for w in weights]))
    n = sum(w.numel() for w in weights)
    return relative * (1.0 + float(norm)) / math.sqrt(n)


def l1_norm(g: Tensor, sign: Tensor) -> Tensor:
    """``‖g‖₁`` as the dot product ``<g, sign(g)>`` (one fused pass; several times faster on CPU than
    the generic 1-norm reduction)."""
    return torch.dot(g.reshape(-1), sign.reshape(-1))


class ActivationProbe:
    """Hooks on the selected layers for the activation term (their outputs, or the inputs they see).

    ``recording()``: for the ``k``-th call of layer ``name``, ``directions[name][k] = sign(∇_a L)`` and
    ``l1[name][k] = ‖∇_a L‖₁`` are stored when the backward reaches the activation; ``weights[(name, k)]``
    (default 1) then scales that call's direction. ``perturbing(scale)``: each recorded call gets
    ``a + scale·weights[(name, k)]·directions[name][k]`` (one fused add); calls without a record are left
    alone. Otherwise the hooks do nothing. For ``site="input"`` the gradient is that of the layer's own
    view of its input (what an activation quantizer on that input rounds), not of other consumers of
    the same tensor.
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], site: str) -> None:
        self.mode: str | None = None
        self.scale = 0.0
        self.site = site
        self.directions: dict[str, list[Tensor | None]] = {}
        self.l1: dict[str, list[Tensor | None]] = {}
        self.weights: dict[tuple[str, int], float] = {}
        self._buffers: dict[tuple[str, int], Tensor] = {}
        self._calls: dict[str, int] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in layers:
            if site == "output":
                self.handles.append(module.register_forward_hook(self._output_hook(name)))
            else:
                self.handles.append(module.register_forward_pre_hook(self._input_hook(name)))

    def _output_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> object:
            return self._visit(name, output)
        return hook

    def _input_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not args:
                return None
            new = self._visit(name, args[0])
            return None if new is args[0] else (new, *args[1:])
        return hook

    def _visit(self, name: str, a: object) -> object:
        if self.mode is None or not isinstance(a, Tensor) or not a.requires_grad or not torch.is_grad_enabled():
            return a
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        if self.mode == "record":
            directions, l1 = self.directions.setdefault(name, []), self.l1.setdefault(name, [])
            directions.append(None)
            l1.append(None)
            # an input gets its own autograd node (the gradient of this use only); an output is this
            # layer's own tensor already
            tracked = a.view_as(a) if self.site == "input" else a

            def store(grad: Tensor) -> None:
                directions[k] = torch.sign(grad, out=self._buffer(name, k, grad))
                l1[k] = l1_norm(grad.detach(), directions[k])

            tracked.register_hook(store)
            return tracked
        recorded = self.directions.get(name, [])
        direction = recorded[k] if k < len(recorded) else None
        if direction is None:
            return a
        return torch.add(a, direction, alpha=self.scale * self.weights.get((name, k), 1.0))

    def _buffer(self, name: str, k: int, like: Tensor) -> Tensor:
        """The direction buffer of call ``k`` of ``name``, kept from step to step: a fresh large tensor
        every step costs more (allocation, page faults) than the sign itself."""
        buf = self._buffers.get((name, k))
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[(name, k)] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return buf

    def records(self) -> list[tuple[str, int]]:
        """``(name, k)`` of every call whose gradient was recorded."""
        return [(name, k) for name, calls in self.directions.items() for k, d in enumerate(calls) if d is not None]

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the activation gradients of the forward + backward run inside."""
        self.directions.clear()
        self.l1.clear()
        self.weights.clear()
        with self._mode("record"):
            yield

    @contextlib.contextmanager
    def perturbing(self, scale: float) -> Iterator[None]:
        """Add ``scale·direction`` to each recorded activation in the forward run inside."""
        self.scale = scale
        with self._mode("perturb"):
            yield

    @contextlib.contextmanager
    def _mode(self, mode: str) -> Iterator[None]:
        self.mode, self._calls = mode, {}
        try:
            yield
        finally:
            self.mode = None

    def remove(self) -> None:
        """Take the hooks off the model and drop the records."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.directions.clear()
        self.l1.clear()
        self.weights.clear()
        self._buffers.clear()


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _take_grads(params: Sequence[Tensor]) -> list[Tensor | None]:
    """The current ``.grad`` of each parameter, which is then cleared (no copy)."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def fd_step(reg: GradL1, model: nn.Module, closure: Closure, optimizer: torch.optim.Optimizer, *,
            before_update: Callable[[], object] | None = None) -> Tensor:
    """One update with the finite-difference gradient-ℓ1 penalty; returns the first pass's loss.

    ``closure()`` runs forward + backward and returns the loss; it is called once at the current
    weights and once (twice with ``reg.central``) at the perturbed point. ``model`` is the unwrapped
    module (under DDP the closure runs the wrapper). ``before_update()`` runs before
    ``optimizer.step()``. Whatever raises leaves the weights and buffers as they were.
    """
    optimizer.zero_grad(set_to_none=True)
    rng = _rng_state(next(model.parameters()).device)
    probe = reg.probe
    with probe.recording() if probe is not None else contextlib.nullcontext():
        loss = closure()
    if reg.weight > 0 or reg.act_weight > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        add_penalty_gradient(reg, model, closure, params, rng)
    if before_update is not None:
        before_update()
    optimizer.step()
    return loss.detach()


def add_penalty_gradient(reg: GradL1, model: nn.Module, closure: Closure, params: Sequence[Tensor],
                         rng: tuple[Tensor, Tensor | None]) -> None:
    """Add ``λ·∇(penalty)`` to the ``.grad`` of ``params`` by finite differences (see the module doc).

    Needs the first pass's gradients in ``.grad`` (and, for the activation term, the probe's record);
    ``rng`` is the random-number state from before the first pass. Sets ``reg.last_penalty``.
    """
    from .gradient import weight_leaf

    weights = [weight_leaf(m) for _, m in reg.layers(model)]
    device = weights[0].device
    numel = reg.normalize == "numel"
    w_terms = [(w, torch.sign(w.grad), reg.weight / (w.numel() if numel else 1))
               for w in weights if reg.weight > 0 and w.requires_grad and w.grad is not None]
    probe = reg.probe
    acts = probe.records() if probe is not None else []
    a_coefs = [reg.act_weight / (probe.directions[n][k].numel() if numel else 1) for n, k in acts]
    penalty = sum((c * l1_norm(w.grad, s) for w, s, c in w_terms), torch.zeros((), device=device))
    penalty = penalty + sum((c * probe.l1[n][k] for (n, k), c in zip(acts, a_coefs, strict=True)),
                            torch.zeros((), device=device))
    reg.last_penalty = float(penalty)
    coefs = [c for _, _, c in w_terms] + a_coefs
    if not coefs:
        return
    kappa = max(coefs)
    for (n, k), c in zip(acts, a_coefs, strict=True):
        probe.weights[(n, k)] = c / kappa
    eps = step_size(weights, reg.fd_eps if reg.fd_eps is not None else relative_step(weights[0].dtype, reg.central))
    base = _take_grads(params)
    saved = [w.detach().clone() for w, _, _ in w_terms]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    after_first = _rng_state(device)
    signs = (1.0, -1.0) if reg.central else (1.0,)
    grads: list[list[Tensor | None]] = []
    try:
        for sign in signs:
            with torch.no_grad():
                for (w, s, c), w0 in zip(w_terms, saved, strict=True):
                    torch.add(w0, s, alpha=sign * eps * c / kappa, out=w)
            _set_rng_state(rng, device)
            with probe.perturbing(sign * eps) if probe is not None else contextlib.nullcontext():
                closure()
            grads.append(_take_grads(params))
    except BaseException:
        for p, g in zip(params, base, strict=True):
            p.grad = g
        raise
    finally:
        with torch.no_grad():
            for (w, _, _), w0 in zip(w_terms, saved, strict=True):
                w.copy_(w0)
            for b, b0 in buffers:
                b.copy_(b0)
        _set_rng_state(after_first, device)
    ref = grads[1] if reg.central else base
    factor = kappa / (eps * len(signs))
    for p, g0, plus, other in zip(params, base, grads[0], ref, strict=True):
        if plus is None and other is None:
            p.grad = g0
            continue
        diff = (plus if plus is not None else torch.zeros_like(other)).sub_(other) if other is not None else plus
        p.grad = diff.mul_(factor) if g0 is None else g0.add_(diff, alpha=factor)


class GradL1Step:
    """Step strategy for :func:`qready.train.fit`: gradient-ℓ1 in finite-difference mode.

    ``fit(model, loader, cfg, step_strategy=GradL1Step(reg))`` with
    ``reg = GradL1(model, ..., mode="finite_difference")`` (not also in ``loss_terms``). Each step:
    forward + backward of the loop's loss, the extra pass(es), gradient clipping, optimizer step.
    Epochs where ``reg`` is inactive (``start_epoch``/``last_epochs``) and λ = 0 are plain steps.
    Logs ``grad_norm`` and ``grad_l1`` (the weighted penalty at the step's weights).
    """

    def __init__(self, reg: GradL1) -> None:
        if getattr(reg, "mode", None) != "finite_difference":
            raise ValueError("GradL1Step needs a GradL1 built with mode='finite_difference'; "
                             f"got mode={getattr(reg, 'mode', None)!r}")
        self.reg = reg

    def step(self, ctx: StepContext) -> Tensor:
        from ..train import StandardStep

        if not self.reg.active(ctx.epoch) or (self.reg.weight == 0 and self.reg.act_weight == 0):
            return StandardStep().step(ctx)

        def closure() -> Tensor:
            total, _ = ctx.compute_loss()
            total.backward()
            return total

        loss = fd_step(self.reg, ctx.model, closure, ctx.optimizer,
                       before_update=lambda: ctx.log("grad_norm", ctx.clip_gradients()))
        ctx.log("grad_l1", self.reg.last_penalty)
        return loss
