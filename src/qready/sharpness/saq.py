"""SAQ: sharpness-aware training of a quantized model (Liu, Cai, Zhuang; docs/methods/sharpness.md).

Objective ``min_w max_{‖ε‖₂ ≤ ρ} L(Q(w) + ε)``, with ``ε`` placed on the *quantized* weights and
computed from the gradient with respect to them: ``ε̂ = ρ · g_Q / ‖g_Q‖``, ``g_Q = ∂L/∂Q(w)``
(ASAM variant: ``ρ · T² g_Q / ‖T g_Q‖``, ``T = |Q(w)| + η``), one global norm over every perturbed
tensor. Mechanism: a :class:`~qready.sharpness.perturbation.Perturbation` parametrization is
appended after each weight's quantizer, so the module computes with ``Q(w) + ε`` while ``w`` is never
touched: the ascent pass reads ``g_Q`` from a zero probe, the descent pass backpropagates through the
quantizer's STE at ``Q(w) + ε``, and the restore sets ``ε`` back to nothing (bit-exact).

What is perturbed: every parametrized weight (through its quantizer: ``Q(w) + ε``); weights of
Linear/Conv/Embedding layers left in float (directly: ``w + ε``); optionally the activation
quantizers' clip values / step sizes (``act_clip``), normalisation layers' affine parameters
(``norm``) and layer biases (``bias``), directly as well.

Use it in :func:`qready.train.fit`::

    qmodel = prepare_qat(model, method="lsq", w_bits=4, a_bits=4, calib=loader)
    fit(qmodel, loader, cfg, step_strategy=SAQStep(rho=0.3), param_groups=qat_param_groups(qmodel, lr=1e-3))

or in your own loop (``closure`` runs forward + backward and returns the loss)::

    saq = SAQ(qmodel, rho=0.3)              # qmodel may be a DDP wrapper
    loss = saq.step(closure, optimizer)
    # or spelled out:
    optimizer.zero_grad()
    with saq.ascent():                       # probes on; under DDP no all-reduce (m-sharpness)
        criterion(qmodel(x), y).backward()
    saq.perturb()                            # the model now computes with Q(w) + ε
    optimizer.zero_grad()
    criterion(qmodel(x), y).backward()       # gradients at Q(w) + ε (averaged under DDP)
    saq.restore()                            # ε removed, buffers (BN statistics) restored
    optimizer.step()

``saq.remove()`` takes the perturbation parametrizations off again (``finalize`` also works with
them attached: they are the identity outside a step).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..quant.layers import is_weight_layer
from ..quant.qat.quantizers import ActivationQAT
from ..train import StepContext, distributed
from .ascent import RhoLike, check_adaptive, check_eta, check_rho_like, rho_at
from .perturbation import Perturbation, attach_perturbation, detach_perturbation
from .twopass import TwoPass, loop_step

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return value


def _direct_targets(model: nn.Module, act_clip: bool, norm: bool, bias: bool) -> list[Tensor]:
    """Plain parameters SAQ perturbs in place (each once, only those that require grad)."""
    found: dict[int, Tensor] = {}

    def add(t: object) -> None:
        if isinstance(t, nn.Parameter) and t.requires_grad:
            found.setdefault(id(t), t)

    for m in model.modules():
        if is_weight_layer(m):
            if not parametrize.is_parametrized(m, "weight"):
                add(getattr(m, "weight", None))
            if bias:
                add(getattr(m, "bias", None))
        elif norm and isinstance(m, NORM_TYPES):
            add(getattr(m, "weight", None))
            add(getattr(m, "bias", None))
        elif act_clip and isinstance(m, ActivationQAT):
            for p in m.parameters(recurse=False):
                add(p)
    return list(found.values())


class SAQ(TwoPass):
    """Sharpness-aware quantization step for ``model`` (a QAT model, or its DDP wrapper).

    Args:
        model: the model; every module whose ``weight`` is parametrized (a QAT quantizer from
            :func:`~qready.quant.prepare_qat`) gets a :class:`Perturbation` appended to its chain.
        rho: radius of the perturbation of the quantized weights (settable per epoch; 0 = plain step).
            The SAQ paper uses 0.3-0.4 for 4-bit ResNets; small networks want less.
        adaptive: ASAM-style ``ε = ρ T² g / ‖T g‖`` with ``T = |Q(w)| + η``.
        eta: ASAM's offset.
        act_clip: also perturb the activation quantizers' learnable parameters (LSQ steps, EWGS bounds).
        norm: also perturb BatchNorm/GroupNorm/LayerNorm affine parameters.
        bias: also perturb Linear/Conv biases.
    """

    def __init__(self, model: nn.Module, rho: float = 0.3, adaptive: bool = False, eta: float = 0.01, *,
                 act_clip: bool = False, norm: bool = False, bias: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        super().__init__(rho, adaptive, eta, model=model)
        inner = distributed.unwrap(model)
        self._direct = _direct_targets(inner, _flag("act_clip", act_clip), _flag("norm", norm), _flag("bias", bias))
        self._modules = [m for m in inner.modules()
                         if not isinstance(m, Perturbation) and parametrize.is_parametrized(m, "weight")]
        self._probes = [attach_perturbation(m) for m in self._modules]
        if not self._direct and not self._probes:
            raise ValueError(f"{type(inner).__name__} has nothing SAQ can perturb (no parametrized or float "
                             "Linear/Conv/Embedding weight that requires grad)")

    def direct_targets(self) -> Sequence[Tensor]:
        return self._direct

    def probe_targets(self) -> Sequence[Perturbation]:
        return self._probes

    def remove(self) -> None:
        """Take the :class:`Perturbation` parametrizations off the model (restoring first)."""
        self.restore()
        for m in self._modules:
            detach_perturbation(m)
        self._probes = []
        self._modules = []


class SAQStep:
    """Step strategy for :func:`qready.train.fit`: one :class:`SAQ` update per batch.

    ``rho`` is a number or a schedule ``epoch -> rho`` (e.g. :class:`~qready.sharpness.RhoSchedule`;
    ρ = 0 costs one pass); the other arguments are :class:`SAQ`'s. The perturbations are attached to
    ``ctx.model`` at the first step. Logs ``rho``, ``grad_norm``, ``ascent_grad_norm`` and
    ``sharpness`` (perturbed minus unperturbed loss).
    """

    def __init__(self, rho: RhoLike = 0.3, adaptive: bool = False, eta: float = 0.01, *, act_clip: bool = False,
                 norm: bool = False, bias: bool = False) -> None:
        self.rho = check_rho_like(rho)
        self.options = {"adaptive": check_adaptive(adaptive), "eta": check_eta(eta), "act_clip": _flag("act_clip", act_clip),
                        "norm": _flag("norm", norm), "bias": _flag("bias", bias)}
        self._saq: SAQ | None = None

    def step(self, ctx: StepContext) -> Tensor:
        rho = rho_at(self.rho, ctx.epoch)
        if self._saq is None or self._saq.model is not ctx.model:
            self._saq = SAQ(ctx.model, rho, **self.options)
        self._saq.rho = rho
        return loop_step(self._saq, ctx)
