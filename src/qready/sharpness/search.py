"""What every mixed-precision search shares: the problem (layers, budget, batches, objective), the
sharpness-aware loss, BOPs of a configuration, the result, and the registry of search methods.

A *configuration* maps each searched layer's name to its weight bit width; its input activations get
``a_bits`` (``"same"``: the weight bits, at least 2; an int; or None: float, counted as 32 bits in
BOPs). A search returns a :class:`MixedPrecisionResult` whose configuration fits the budget.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..batching import Inputs, forward, output_tensor
from ..quant.select import Selector
from ..quant.spec import ACT_BITS
from ..registry import Registry
from .bops import bops_from_macs
from .twopass import ParamsTwoPass

ActBits = int | str | None
Criterion = Callable[[Tensor, Tensor], Tensor]
OBJECTIVES: tuple[str, ...] = ("ce", "kl")


def act_bits(a_bits: ActBits, b: int) -> int | None:
    """Input-activation bits of a layer whose weights have ``b`` bits (None: float activations)."""
    if a_bits == "same":
        return max(b, 2)
    return a_bits  # type: ignore[return-value]


def check_act(a_bits: ActBits) -> None:
    """Refuse an ``a_bits`` that is not ``"same"``, None or an activation bit width."""
    if not (a_bits is None or a_bits == "same" or (isinstance(a_bits, int) and not isinstance(a_bits, bool)
                                                   and a_bits in ACT_BITS)):
        raise ValueError(f"a_bits must be 'same', None (float activations) or one of {list(ACT_BITS)}; got {a_bits!r}")


def config_bops(macs: Mapping[str, int], config: Mapping[str, int], a_bits: ActBits = "same") -> int:
    """Total BOPs of ``config`` (layer -> weight bits) with activation bits per ``a_bits``."""
    return bops_from_macs(macs, dict(config), {n: act_bits(a_bits, b) or 32 for n, b in config.items()}).total


def exact_names(names: Iterable[str]) -> tuple[str, ...]:
    """Selector regexes matching exactly ``names``."""
    return tuple(f"^{re.escape(n)}$" for n in names)


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``[..., C]`` against class indices ``[...]``."""
    return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def kl_to_teacher(output: Tensor, teacher: Tensor) -> Tensor:
    """Mean over positions of ``KL(softmax(teacher) ‖ softmax(output))`` (logits ``[..., C]``): the
    label-free loss, the float model's own logits as the teacher."""
    from ..evaluate.fidelity import softmax_kl

    return softmax_kl(teacher.float(), output.float()).mean()


def sharpness_loss(model: nn.Module, weights: Sequence[Tensor], batches: Sequence[tuple[Inputs, Tensor]],
                   rho: float, adaptive: bool = False, eta: float = 0.01, criterion: Criterion = cross_entropy) -> float:
    """Mean over ``batches`` of ``criterion(model(x) with weights w + ε̂, target)``, ``ε̂`` the SAM/ASAM
    ascent of ``weights`` on that batch (per-batch perturbation; ``model`` in its current mode;
    ``weights`` restored afterwards). ``rho = 0``: the plain loss."""
    method = ParamsTwoPass(lambda: weights, rho, adaptive, eta, model=model)
    total = 0.0
    for x, target in batches:
        for w in weights:
            w.grad = None
        if rho > 0:
            with method.ascent():
                criterion(output_tensor(forward(model, x)), target).backward()
            method.perturb()
        try:
            with torch.no_grad():
                total += float(criterion(output_tensor(forward(model, x)), target))
        finally:
            method.restore()
    for w in weights:
        w.grad = None
    return total / len(batches)


@dataclass
class SearchProblem:
    """One search: the float ``model`` (not modified), the ``data`` batches ``(inputs, target)`` on the
    model's device (targets: labels for ``"ce"``, the float model's logits for ``"kl"``), per-layer
    ``macs``, the ``selector`` that chose the ``layers`` (model order), the searched layers ``free`` (model order) and the pinned ones ``fixed`` (name -> bits),
    candidate ``bits``, ``a_bits``, the budget ``target`` (BOPs) and the loss settings."""

    model: nn.Module
    selector: Selector
    data: list[tuple[Inputs, Tensor]]
    criterion: Criterion
    macs: dict[str, int]
    layers: list[str]
    free: list[str]
    fixed: dict[str, int]
    bits: list[int]
    a_bits: ActBits
    target: float
    lam: float
    rho: float
    adaptive: bool

    def full(self, assign: Mapping[str, int]) -> dict[str, int]:
        """Every layer of the configuration (model order): ``assign`` for searched layers (max bits where
        missing), pinned layers at their bits."""
        return {n: assign.get(n, self.fixed.get(n, self.bits[-1])) for n in self.layers}

    def bops(self, config: Mapping[str, int]) -> int:
        return config_bops(self.macs, config, self.a_bits)

    def penalty(self, total: float) -> float:
        """``lam · (BOPs / target − 1)²``."""
        return self.lam * (total / self.target - 1.0) ** 2

    def loss(self, model: nn.Module, weights: Sequence[Tensor]) -> float:
        """The sharpness-aware loss of ``model`` (already quantized with a configuration) on ``data``."""
        return sharpness_loss(model, weights, self.data, self.rho, self.adaptive, criterion=self.criterion)

    def row(self, config: Mapping[str, int], loss: float, source: str) -> dict:
        """A measured candidate: ``config``, ``bops``, ``loss``, ``objective`` (loss + penalty), ``source``."""
        total = self.bops(config)
        return {"config": dict(config), "bops": total, "loss": loss, "objective": loss + self.penalty(total),
                "source": source}


@dataclass
class MixedPrecisionResult:
    """The chosen configuration and how it was found.

    ``config``: layer name -> bit width (weights; activations per ``a_bits``), pinned layers included;
    ``bops``: its BOPs (``<= target``); ``loss``: its measured sharpness-aware loss; ``objective``:
    ``loss + lam·penalty``; ``search``: the method's name; ``sensitivity`` (sensitivity search):
    ``{layer: {bits: Δ loss}}``; ``probabilities`` (REINFORCE): ``{layer: {bits: p}}``, the policy's
    final distribution at each layer (given the chosen bits of the layers before it);
    ``candidates``: every measured candidate (``config``, ``bops``, ``loss``, ``objective``,
    ``source``); ``history`` (REINFORCE): one dict per policy step; ``seconds``: search wall time.
    """

    config: dict[str, int]
    bops: int
    target: float
    loss: float
    objective: float
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)
    candidates: list[dict] = field(default_factory=list)
    search: str = "sensitivity"
    probabilities: dict[str, dict[int, float]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def layer_rows(self, macs: Mapping[str, int] | None = None, a_bits: ActBits = "same") -> list[dict]:
        """One dict per layer: ``name``, ``bits``, and the evidence (``sensitivity`` or ``probabilities``,
        ``{bits: value}``), plus ``macs`` and ``bops`` when ``macs`` is given."""
        rows = []
        for name, b in self.config.items():
            row: dict = {"name": name, "bits": b}
            if macs is not None:
                row["macs"] = macs[name]
                row["bops"] = config_bops(macs, {name: b}, a_bits)
            if name in self.sensitivity:
                row["sensitivity"] = dict(self.sensitivity[name])
            if name in self.probabilities:
                row["probabilities"] = dict(self.probabilities[name])
            rows.append(row)
        return rows

    def to_dict(self, macs: Mapping[str, int] | None = None, a_bits: ActBits = "same") -> dict:
        """A JSON-ready summary: search, config, bops, target, loss, objective, seconds, per-layer rows,
        candidates and history."""
        return {"search": self.search, "config": dict(self.config), "bops": self.bops, "target": self.target,
                "bops_ratio": self.bops / self.target, "loss": self.loss, "objective": self.objective,
                "seconds": self.seconds, "layers": self.layer_rows(macs, a_bits), "candidates": self.candidates,
                "history": self.history}


SEARCHES: Registry[MixedPrecisionResult] = Registry("mixed-precision search")
