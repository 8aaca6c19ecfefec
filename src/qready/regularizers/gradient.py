"""Gradient-ℓ1 regularization (Alizadeh et al., ICLR 2020): make the loss flat in the ℓ∞ ball.

Rounding a tensor onto a grid of step δ perturbs it by Δ with ‖Δ‖∞ ≤ δ/2, so to first order
``L(w + Δ) − L(w) ≤ (δ/2)·‖∇L‖₁`` (Hölder). Penalising the ℓ1 norm of the gradient therefore protects
every bit width at once:

    λ_w Σ_l ‖∇_{W_l} L‖₁ + λ_a Σ_l ‖∇_{a_l} L‖₁

Both gradients come from **one** ``torch.autograd.grad(loss, [weights..., activations...],
create_graph=True)`` call; the caller's ``backward()`` of the total loss then differentiates through
them (double backprop; BatchNorm in train mode is supported by PyTorch's double backward).

Activations ``a_l`` are captured by forward hooks on the selected layers (their outputs, or their
inputs with ``act_site="input"`` — the tensors that activation quantization rounds), registered when the
regularizer is built and only when ``act_weight > 0``. The hooks keep the tensors of the most recent
forward run with gradients enabled, so call the regularizer **after the forward that produced**
``loss`` and before any other forward (``qready.train.fit`` does this). Call :meth:`GradL1.remove` to
take the hooks off the model.

``mode="finite_difference"`` obtains the same gradient from one extra forward + backward at weights
moved by ``ε·sign(∇_W L)`` instead of double backprop (:mod:`qready.regularizers.gradient_fd`); it is
not a loss term but a step: :meth:`GradL1.step` in a user's loop, :meth:`GradL1.step_strategy` in
:func:`qready.train.fit`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..quant.select import Selector
from .base import DEFAULT_WEIGHT, REGULARIZERS, Regularizer
from .gradient_fd import ActivationProbe, Closure, GradL1Step, fd_step

NORMALIZE = ("none", "numel")
ACT_SITES = ("output", "input")
MODES = ("exact", "finite_difference")


def weight_leaf(module: nn.Module) -> torch.Tensor:
    """The trainable tensor behind ``module.weight`` (the original of a parametrized weight)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def l1_per_tensor(grads: list[torch.Tensor], normalize: str) -> torch.Tensor:
    """Sum over tensors of ``‖g‖₁`` (``normalize="numel"``: of ``‖g‖₁ / g.numel()``); a scalar."""
    norms = torch.stack([g.abs().sum() for g in grads])
    if normalize == "numel":
        norms = norms / torch.tensor([g.numel() for g in grads], dtype=norms.dtype, device=norms.device)
    return norms.sum()


def resolve_start_epoch(start_epoch: int, last_epochs: int | None, epochs: int | None) -> int:
    """``start_epoch``, or ``epochs − last_epochs`` when the penalty is asked for the last epochs only."""
    if last_epochs is None and epochs is None:
        return start_epoch
    if last_epochs is None or epochs is None:
        raise ValueError("last_epochs and epochs must be given together "
                         f"(got last_epochs={last_epochs!r}, epochs={epochs!r})")
    for name, value in (("last_epochs", last_epochs), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    if last_epochs > epochs:
        raise ValueError(f"last_epochs must be <= epochs ({epochs}); got {last_epochs!r}")
    if start_epoch != 0:
        raise ValueError(f"give either start_epoch or last_epochs/epochs, not both (start_epoch={start_epoch!r})")
    return epochs - last_epochs


@REGULARIZERS.register("grad_l1")
class GradL1(Regularizer):
    """λ_w Σ_l ‖∇_{W_l} L‖₁ + λ_a Σ_l ‖∇_{a_l} L‖₁ over the selected layers.

    ``mode="exact"`` (double backprop): called as ``reg(model, loss=task_loss)`` with the task loss
    still carrying its graph; add the result to the loss and call ``backward()`` on the sum.
    ``mode="finite_difference"``: the penalty's gradient is added by :meth:`step` (one extra forward +
    backward per step, about half the exact mode's cost); see :mod:`qready.regularizers.gradient_fd`.

    Args:
        model: the model; activation hooks are registered on its selected layers when ``act_weight > 0``.
        weight: λ_w, the multiplier of the weight-gradient term (0 switches it off).
        select: which layers (a :class:`~qready.quant.Selector` or its keyword arguments).
        start_epoch: active from this 0-based epoch on. The paper applies the penalty only in the last
            epochs: pass ``start_epoch = epochs − N``, or ``last_epochs=N, epochs=epochs``.
        act_weight: λ_a, the multiplier of the activation-gradient term (default 0: weights only).
        normalize: ``"none"`` sums raw ℓ1 norms (the paper's form); ``"numel"`` divides each tensor's ℓ1 by
            its element count (mean |g|, so large layers do not dominate; λ then needs to be much larger).
        act_site: which activation of a selected layer: its ``"output"`` or its ``"input"``. Inputs that do
            not require grad (the data fed to the first layer) are skipped.
        last_epochs, epochs: convenience for ``start_epoch = epochs − last_epochs``.
        mode: ``"exact"`` or ``"finite_difference"``.
        fd_eps: finite-difference mode: relative step ``r`` in ``ε = r·(1 + ‖W‖₂)/√N`` (default
            ``√(machine ε)``, or ``∛(machine ε)`` with ``central``).
        central: finite-difference mode: central difference (two extra passes, error ``O(ε²)``).
    """

    name = "grad_l1"

    def __init__(self, model: nn.Module, weight: float = DEFAULT_WEIGHT, select: Selector | dict | None = None,
                 start_epoch: int = 0, *, act_weight: float = 0.0, normalize: str = "none",
                 act_site: str = "output", last_epochs: int | None = None, epochs: int | None = None,
                 mode: str = "exact", fd_eps: float | None = None, central: bool = False) -> None:
        super().__init__(model, weight=weight, select=select,
                         start_epoch=resolve_start_epoch(start_epoch, last_epochs, epochs))
        if isinstance(act_weight, bool) or not isinstance(act_weight, (int, float)) or act_weight < 0:
            raise ValueError(f"act_weight must be a number >= 0; got {act_weight!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
        if act_site not in ACT_SITES:
            raise ValueError(f"act_site must be one of {ACT_SITES}; got {act_site!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if fd_eps is not None and (isinstance(fd_eps, bool) or not isinstance(fd_eps, (int, float))
                                   or not 0 < fd_eps < 1):
            raise ValueError(f"fd_eps must be a number in (0, 1) or None; got {fd_eps!r}")
        if not isinstance(central, bool):
            raise ValueError(f"central must be a bool; got {central!r}")
        if mode == "exact" and (fd_eps is not None or central):
            raise ValueError("fd_eps and central apply to mode='finite_difference' only")
        self.act_weight = float(act_weight)
        self.normalize = normalize
        self.act_site = act_site
        self.mode = mode
        self.fd_eps = None if fd_eps is None else float(fd_eps)
        self.central = central
        self.needs_graph = mode == "exact"
        self.owns_step = mode == "finite_difference"  # applied by a step strategy, not as a loss term
        self.last_penalty: float | None = None
        self._acts: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.probe: ActivationProbe | None = None
        if self.act_weight > 0 and mode == "finite_difference":
            self.probe = ActivationProbe(list(self.layers(model)), act_site)
        elif self.act_weight > 0:
            for name, module in self.layers(model):
                self._handles.append(module.register_forward_hook(self._capture(name)))

    def _capture(self, name: str) -> Callable:
        """A forward hook storing the layer's activation of a forward run with gradients enabled.

        A closure, not a bound method, so that ``copy.deepcopy(model)`` does not copy the regularizer.
        """
        acts, site = self._acts, self.act_site

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            tensor = output if site == "output" else (inputs[0] if inputs else None)
            if torch.is_grad_enabled() and isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                acts[name] = tensor

        return hook

    def remove(self) -> None:
        """Take the activation hooks off the model and drop the stored activations."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._acts.clear()
        if self.probe is not None:
            self.probe.remove()

    def gradient_l1(self, model: nn.Module, loss: torch.Tensor | None, *, weights: bool = True,
                    activations: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ_l ‖∇_{W_l} L‖₁, Σ_l ‖∇_{a_l} L‖₁)``, unweighted, from one ``autograd.grad`` call.

        The activation term needs ``act_weight > 0`` (hooks) and is 0 otherwise, like a term not asked
        for. Both keep the graph (``create_graph=True``), so they can be added to the loss.
        """
        if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
            got = "None" if loss is None else ("a tensor without grad_fn" if isinstance(loss, torch.Tensor)
                                               else type(loss).__name__)
            raise ValueError("grad_l1 needs loss= the task loss with its autograd graph (not detached, "
                             f"computed with gradients enabled); got {got}")
        if loss.numel() != 1:
            raise ValueError(f"grad_l1 needs a scalar loss; got shape {tuple(loss.shape)}")
        w_list = [weight_leaf(m) for _, m in self.layers(model)] if weights else []
        w_list = [w for w in w_list if w.requires_grad]
        a_names = list(self._acts) if activations and self._handles else []
        a_list = [self._acts[name] for name in a_names]
        self._acts.clear()
        zero = loss.new_zeros(())
        if not w_list and not a_list:
            return zero, zero
        grads = torch.autograd.grad(loss, w_list + a_list, create_graph=True, allow_unused=True)
        w_grads = [g for g in grads[:len(w_list)] if g is not None]
        a_grads = grads[len(w_list):]
        stale = [name for name, g in zip(a_names, a_grads, strict=True) if g is None]
        if stale:
            raise RuntimeError(f"grad_l1: the stored activations of {stale} are not part of loss's graph; "
                               "call the regularizer right after the forward that produced loss")
        w_l1 = l1_per_tensor(w_grads, self.normalize) if w_grads else zero
        a_l1 = l1_per_tensor(list(a_grads), self.normalize) if a_grads else zero
        return w_l1, a_l1

    def penalty(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        """Unweighted ``Σ‖∇_W L‖₁ + Σ‖∇_a L‖₁`` (the second only when ``act_weight > 0``)."""
        w_l1, a_l1 = self.gradient_l1(model, loss)
        return w_l1 + a_l1

    def forward(self, model: nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        """``λ_w·Σ‖∇_W L‖₁ + λ_a·Σ‖∇_a L‖₁``; an exact zero (no ``autograd.grad`` call) when both λ are 0."""
        if self.mode == "finite_difference":
            raise RuntimeError("grad_l1 with mode='finite_difference' is not a loss term: use "
                               "reg.step(closure, optimizer) in your own loop, or "
                               "fit(..., step_strategy=reg.step_strategy()) without it in loss_terms")
        w_l1, a_l1 = self.gradient_l1(model, loss, weights=self.weight > 0, activations=self.act_weight > 0)
        return self.weight * w_l1 + self.act_weight * a_l1

    def step(self, model: nn.Module, closure: Closure, optimizer: torch.optim.Optimizer, *,
             before_update: Callable[[], object] | None = None) -> torch.Tensor:
        """Finite-difference mode: one whole update; returns the loss of the first pass (detached).

        ``closure()`` runs forward + backward of the loss at the current weights and returns it (it is
        called again at the perturbed point); ``model`` is the unwrapped module. The gradients are zeroed
        first; ``before_update()`` (e.g. gradient clipping) runs before ``optimizer.step()``. The penalty
        is always applied: for ``start_epoch``/``last_epochs`` check :meth:`active` in your loop.
        """
        if self.mode != "finite_difference":
            raise RuntimeError("GradL1.step is the finite-difference mode's update; in mode='exact' add "
                               "reg(model, loss=loss) to the loss instead")
        return fd_step(self, model, closure, optimizer, before_update=before_update)

    def step_strategy(self) -> GradL1Step:
        """The step strategy for ``fit(..., step_strategy=...)`` (finite-difference mode)."""
        return GradL1Step(self)
