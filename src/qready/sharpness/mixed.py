"""Mixed precision under a BOPs budget: per-layer bit widths, then QAT/SAQ of the mixed model.

Objective (DESIGN.md §4.4, SAQ v1): minimise ``J(c) = L_SA(c) + λ·((BOPs(c) − T)/T)²`` over
configurations ``c`` (one bit width per layer from ``bits``, for its weights and its input
activations) with ``BOPs(c) <= T``, where ``L_SA(c)`` is the sharpness-aware loss of the model
quantized with ``c``: ``L(Q_c(w) + ε̂)``, ``ε̂ = ρ·g/‖g‖`` from the gradient with respect to the
quantized weights, averaged over a few batches.

The paper trains a REINFORCE policy over a weight-sharing supernet. This module optimises the same
objective more cheaply (the documented equivalent):

1. **Weight-sharing views.** For each bit width ``b`` the float model is quantized once with PTQ
   (per-channel weights, calibrated input quantizers): every configuration reuses these per-layer
   quantized weights and activation quantizers, so a configuration is assembled by swapping layers,
   never re-trained.
2. **Sensitivities.** ``Δ_l(b) = L_SA(all layers at max bits, layer l at b) − L_SA(all at max)``
   on the same batches: one evaluation per (layer, lower bit width).
3. **Allocation.** With the additive model ``L_SA(c) ≈ L_SA(max) + Σ_l Δ_l(c_l)`` an exact dynamic
   programme over the budget (integer BOPs divided by their gcd; rounded *up* to ``T/resolution``
   units when that is too fine, so no solution exceeds the budget) gives the best configuration for
   every BOPs level; ``J`` is then evaluated for each.
4. **Flattest within budget.** The ``candidates`` best configurations by the additive ``J`` (plus every
   uniform configuration that fits) are measured with the real ``L_SA``; the lowest measured ``J``
   wins.

Then :func:`prepare_mixed` attaches QAT quantizers per bit group (``prepare_qat`` with an exact-name
:class:`~qready.quant.Selector`, in place, once per bit width) for fine-tuning, e.g. with
:class:`~qready.sharpness.SAQStep`.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..batching import batch_inputs
from ..quant.activations import ATTR
from ..quant.ptq import ptq
from ..quant.qat import calibrate_activation_quantizers, prepare_qat
from ..quant.qat.quantizers import ActivationQAT
from ..quant.select import Selector, as_selector
from ..quant.spec import ACT_BITS, QuantSpec
from .ascent import check_rho
from .bops import LAYER_TYPES, bops_from_macs, layer_macs
from .twopass import ParamsTwoPass

ActBits = int | str | None


@dataclass
class MixedPrecisionResult:
    """The chosen configuration and how it was found.

    ``config``: layer name -> bit width (weights; activations per ``a_bits``), fixed layers included;
    ``bops``: its BOPs (``<= target``); ``loss``: its measured sharpness-aware loss; ``objective``:
    ``loss + λ·penalty``; ``sensitivity``: ``{layer: {bits: Δ L_SA}}``; ``candidates``: every measured
    candidate (``config``, ``bops``, ``loss``, ``objective``, ``source``).
    """

    config: dict[str, int]
    bops: int
    target: float
    loss: float
    objective: float
    sensitivity: dict[str, dict[int, float]]
    candidates: list[dict] = field(default_factory=list)


def _act_bits(a_bits: ActBits, b: int) -> int | None:
    """Input-activation bits of a layer whose weights have ``b`` bits (None: float activations)."""
    if a_bits == "same":
        return max(b, 2)
    return a_bits  # type: ignore[return-value]


def _check_act(a_bits: ActBits) -> None:
    if not (a_bits is None or a_bits == "same" or (isinstance(a_bits, int) and not isinstance(a_bits, bool)
                                                   and a_bits in ACT_BITS)):
        raise ValueError(f"a_bits must be 'same', None (float activations) or one of {list(ACT_BITS)}; got {a_bits!r}")


def _bops_bits(a_bits: ActBits, config: Mapping[str, int]) -> dict[str, int]:
    """Activation bits per layer for BOPs (float activations count 32)."""
    return {n: _act_bits(a_bits, b) or 32 for n, b in config.items()}


def config_bops(macs: Mapping[str, int], config: Mapping[str, int], a_bits: ActBits = "same") -> int:
    """Total BOPs of ``config`` (layer -> weight bits) with activation bits per ``a_bits``."""
    return bops_from_macs(macs, dict(config), _bops_bits(a_bits, config)).total


def _exact(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(f"^{re.escape(n)}$" for n in names)


class _Views:
    """The model quantized at each bit width (PTQ) and a working copy assembled per configuration."""

    def __init__(self, model: nn.Module, calib: Sequence, bits: Sequence[int], selector: Selector, a_bits: ActBits,
                 w_range: str, a_range: str, granularity: str) -> None:
        self.views: dict[int, dict[str, nn.Module]] = {}
        for b in bits:
            act = _act_bits(a_bits, b)
            act_spec = (QuantSpec(bits=act, symmetric=False, granularity="tensor", range=a_range)
                        if act is not None else None)
            view = ptq(model, QuantSpec(bits=b, granularity=granularity, range=w_range), calib, act_spec=act_spec,
                       select=selector, calib_batches=len(calib))
            self.views[b] = dict(view.named_modules())
        top = max(bits)
        self.work = copy.deepcopy(self.views[top][""]).eval()
        self.layers = {item.name: item.module for item in selector.select(self.work)}
        self.work.requires_grad_(False)
        for m in self.layers.values():
            m.weight.requires_grad_(True)

    @torch.no_grad()
    def assemble(self, config: Mapping[str, int]) -> None:
        """Give each layer of ``config`` its weight and input quantizer from the view at its bits."""
        for name, b in config.items():
            source, layer = self.views[b][name], self.layers[name]
            layer.weight.copy_(source.weight)
            quantizer = getattr(source, ATTR, None)
            if quantizer is not None:
                setattr(layer, ATTR, quantizer)


def sharpness_loss(model: nn.Module, weights: Sequence[Tensor], batches: Sequence[tuple[Tensor, Tensor]],
                   rho: float, adaptive: bool = False, eta: float = 0.01) -> float:
    """Mean over ``batches`` of ``L(w + ε̂)``, ``ε̂`` the SAM/ASAM ascent of ``weights`` on that batch
    (per-batch perturbation; ``model`` in its current mode; ``weights`` restored afterwards)."""
    criterion = nn.CrossEntropyLoss()
    method = ParamsTwoPass(lambda: weights, rho, adaptive, eta, model=model)
    total = 0.0
    for x, y in batches:
        for w in weights:
            w.grad = None
        if rho > 0:
            with method.ascent():
                criterion(model(x), y).backward()
            method.perturb()
        try:
            with torch.no_grad():
                total += float(criterion(model(x), y))
        finally:
            method.restore()
    for w in weights:
        w.grad = None
    return total / len(batches)


def _units(costs: np.ndarray, budget: int, max_units: int) -> tuple[np.ndarray, int, float]:
    """Integer DP costs: exact (BOPs divided by their gcd) when the budget then spans at most
    ``max_units`` units, else rounded *up* to ``budget / max_units`` units (every DP solution then
    stays within budget). Returns ``(units [L, K], budget in units, BOPs per unit)``."""
    g = int(np.gcd.reduce(costs.reshape(-1)))
    if budget // g <= max_units:
        return costs // g, budget // g, float(g)
    unit = budget / max_units
    return np.ceil(costs / unit - 1e-9).astype(np.int64), max_units, unit


def _allocate(units: np.ndarray, deltas: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact DP: ``best[u]`` = min Σ Δ over configurations costing exactly ``u`` units (inf when none);
    ``choices[l, u]`` = the choice of layer ``l`` in that configuration (for :func:`_backtrack`)."""
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    choices = np.zeros((units.shape[0], budget + 1), dtype=np.int8)
    for layer in range(units.shape[0]):
        new = np.full(budget + 1, np.inf)
        for j, c in enumerate(units[layer]):
            if c > budget:
                continue
            cand = np.full(budget + 1, np.inf)
            cand[c:] = best[: budget + 1 - c] + deltas[layer, j]
            better = cand < new
            new[better] = cand[better]
            choices[layer, better] = j
        best = new
    return best, choices


def _backtrack(choices: np.ndarray, costs_units: np.ndarray, u: int) -> list[int]:
    picks = []
    for layer in range(choices.shape[0] - 1, -1, -1):
        j = int(choices[layer, u])
        picks.append(j)
        u -= int(costs_units[layer, j])
    return picks[::-1]


def search_mixed_precision(
    model: nn.Module,
    calib: Iterable,
    input_shape: Sequence[int],
    target_bops: float,
    *,
    bits: Sequence[int] = (2, 3, 4, 5),
    a_bits: ActBits = "same",
    select: Selector | dict | None = None,
    rho: float = 0.05,
    adaptive: bool = False,
    lam: float = 1.0,
    batches: int = 4,
    candidates: int = 8,
    w_range: str = "mse",
    a_range: str = "mse",
    granularity: str = "channel",
    resolution: int = 200_000,
) -> MixedPrecisionResult:
    """Per-layer bit widths from ``bits`` with ``BOPs <= target_bops`` minimising the sharpness-aware
    loss plus ``lam · ((BOPs − T)/T)²`` (see the module docstring for the method).

    Args:
        model: the float model (not modified).
        calib: ``(x, y)`` batches; the first ``batches`` calibrate the quantizers and measure losses.
        input_shape: one sample's shape (no batch dim), for the MACs.
        target_bops: the budget ``T`` (e.g. ``bops(model, shape, 3, 3).total`` restricted to the layers).
        bits: candidate bit widths per layer (weights; 1-8).
        a_bits: ``"same"`` (a layer's input activations get its weight bits), an int (every searched
            layer's inputs at that width) or None (float activations, counted as 32 bits).
        select: which layers (a :class:`~qready.quant.Selector`; default every Conv/Linear); layers
            the selector pins (``first_last=8``) keep that width and count in the budget; layers it
            leaves in float are not in the configuration.
        rho, adaptive: the ascent of the sharpness-aware loss (``rho=0``: plain quantized loss).
        lam: weight of the budget penalty ``((BOPs − T)/T)²``.
        batches: number of batches used for calibration and every loss measurement.
        candidates: how many DP solutions are measured for the final choice.
        w_range, a_range, granularity: the PTQ quantizers of the views (see :class:`~qready.QuantSpec`);
            MSE ranges clip like the learned LSQ ranges the fine-tuning will end with (min-max at 2-3 bits
            spends the grid on outliers and exaggerates a layer's sensitivity).
        resolution: at most this many budget units in the DP: BOPs are exact integers (divided by
            their gcd) when that fits, else rounded up to ``T/resolution`` (never exceeding ``T``).
    Returns:
        a :class:`MixedPrecisionResult` whose ``config`` satisfies ``bops <= target_bops``.
    """
    bits = sorted({int(b) for b in bits})
    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise ValueError(f"bits must be a non-empty sequence of weight bit widths 1-8; got {bits!r}")
    _check_act(a_bits)
    rho = check_rho(rho)
    if isinstance(target_bops, bool) or not isinstance(target_bops, (int, float)) or not target_bops > 0:
        raise ValueError(f"target_bops must be a number > 0; got {target_bops!r}")
    for name, value, low in (("batches", batches, 1), ("candidates", candidates, 1), ("resolution", resolution, 10)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"lam must be a number >= 0; got {lam!r}")
    selector = as_selector(select) if select is not None else Selector(types=LAYER_TYPES)

    data: list[tuple[Tensor, Tensor]] = []
    for batch in calib:
        if len(data) >= batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("calib must yield (inputs, targets) batches (the search measures losses)")
        data.append((batch_inputs(batch), batch[1]))
    if not data:
        raise ValueError("calib yielded no batches")
    device = next(iter(model.parameters())).device
    data = [(x.to(device), y.to(device)) for x, y in data]

    macs = layer_macs(model, input_shape)
    chosen = selector.select(model)
    no_macs = [item.name for item in chosen if item.name not in macs]
    if no_macs:
        raise ValueError(f"selected layers {no_macs} have no MACs (not Conv/Linear, or not run by the forward); "
                         "exclude them from select")
    fixed = {item.name: item.bits_override for item in chosen if item.bits_override is not None}
    free = [item.name for item in chosen if item.bits_override is None]
    if not free:
        raise ValueError("the selector leaves no layer to search (all are pinned or float)")
    fixed_bops = config_bops(macs, fixed, a_bits) if fixed else 0
    free_budget = target_bops - fixed_bops
    lowest = config_bops(macs, dict.fromkeys(free, bits[0]), a_bits)
    if lowest > free_budget:
        raise ValueError(f"target_bops={target_bops:.4g} is below the cheapest configuration "
                         f"({fixed_bops + lowest:.4g} BOPs: every searched layer at {bits[0]} bits)")

    views = _Views(model, data, bits, selector, a_bits, w_range, a_range, granularity)
    weights = [views.layers[n].weight for n in [*free, *fixed]]
    top = bits[-1]

    def measure(config: Mapping[str, int]) -> float:
        views.assemble({n: config[n] for n in free})  # pinned layers are the same in every view
        return sharpness_loss(views.work, weights, data, rho, adaptive)

    def full(assign: Mapping[str, int]) -> dict[str, int]:
        return {item.name: assign.get(item.name, fixed.get(item.name, top)) for item in chosen}

    def penalty(total: float) -> float:
        return lam * ((total - target_bops) / target_bops) ** 2

    base = measure(full(dict.fromkeys(free, top)))
    sensitivity = {n: {b: (measure(full({**dict.fromkeys(free, top), n: b})) - base if b != top else 0.0)
                       for b in bits} for n in free}

    costs = np.array([[bops_from_macs(macs, {n: b}, {n: _act_bits(a_bits, b) or 32}).total for b in bits]
                      for n in free], dtype=np.int64)
    deltas = np.array([[sensitivity[n][b] for b in bits] for n in free])
    units, budget_units, unit = _units(costs, int(math.floor(free_budget)), resolution)
    best, choices = _allocate(units, deltas, budget_units)
    feasible = np.flatnonzero(np.isfinite(best))
    approx = best[feasible] + np.array([penalty(fixed_bops + u * unit) for u in feasible])
    proposals: list[tuple[str, dict[str, int]]] = []
    for u in feasible[np.argsort(approx, kind="stable")][:candidates]:
        picks = _backtrack(choices, units, int(u))
        proposals.append(("dp", full({n: bits[j] for n, j in zip(free, picks, strict=True)})))
    for b in bits:
        proposals.append((f"uniform {b}", full(dict.fromkeys(free, b))))

    measured: list[dict] = []
    seen: set[tuple] = set()
    for source, config in proposals:
        key = tuple(sorted(config.items()))
        total = config_bops(macs, config, a_bits)
        if key in seen or total > target_bops:
            continue
        seen.add(key)
        loss = measure(config)
        measured.append({"config": config, "bops": total, "loss": loss, "objective": loss + penalty(total),
                         "source": source})
    best_row = min(measured, key=lambda r: r["objective"])  # the uniform bits[0] proposal always fits
    assert best_row["bops"] <= target_bops, (best_row["bops"], target_bops)
    return MixedPrecisionResult(config=dict(best_row["config"]), bops=int(best_row["bops"]), target=float(target_bops),
                                loss=best_row["loss"], objective=best_row["objective"], sensitivity=sensitivity,
                                candidates=measured)


def prepare_mixed(
    model: nn.Module,
    config: Mapping[str, int],
    method: str = "lsq",
    a_bits: ActBits = "same",
    calib: Iterable | None = None,
    inplace: bool = False,
    *,
    calib_batches: int = 8,
    **qat_options,
) -> nn.Module:
    """QAT quantizers with per-layer bit widths: ``prepare_qat`` once per bit width, each time on the
    layers of ``config`` that have it (exact-name selector, in place on one copy), then one joint
    calibration of every input quantizer on ``calib`` (as a single ``prepare_qat`` call does, so a
    uniform ``config`` gives exactly the model ``prepare_qat`` gives).

    ``a_bits``: as in :func:`search_mixed_precision` (``"same"``: each layer's inputs at its weight
    bits, at least 2). ``qat_options`` go to every ``prepare_qat`` call (e.g. ``w_granularity``).
    Layers not in ``config`` stay float. Returns the prepared model (``model`` itself when ``inplace``).
    """
    _check_act(a_bits)
    if not config:
        raise ValueError("config is empty: nothing to quantize")
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"config names modules that {type(model).__name__} does not have: {unknown}")
    target = model if inplace else copy.deepcopy(model)
    for b in sorted(set(config.values())):
        group = sorted(n for n, v in config.items() if v == b)
        prepare_qat(target, method=method, w_bits=b, a_bits=_act_bits(a_bits, b), select=Selector(include=_exact(group)),
                    inplace=True, **qat_options)
    quantizers = [q for n in config if isinstance(q := getattr(target.get_submodule(n), ATTR, None), ActivationQAT)]
    if calib is not None and quantizers:
        calibrate_activation_quantizers(target, quantizers, calib, calib_batches)
    return target
