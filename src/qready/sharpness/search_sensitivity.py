"""``search="sensitivity"``: per-layer sensitivities and an exact dynamic programme under the budget.

The cheap substitute for the policy search, optimising the same objective
``J(c) = L_SA(c) + λ·(BOPs(c)/T − 1)²`` over configurations with ``BOPs(c) <= T``:

1. **Views.** For each bit width ``b`` the float model is quantized once with PTQ (per-channel
   weights, calibrated input quantizers); a configuration is assembled by copying each layer's
   quantized weight and input quantizer from the view at its bits, never re-trained.
2. **Sensitivities.** ``Δ_l(b) = L_SA(all layers at max bits, layer l at b) − L_SA(all at max)`` on the
   same batches: one evaluation per (layer, lower bit width).
3. **Allocation.** With the additive model ``L_SA(c) ≈ L_SA(max) + Σ_l Δ_l(c_l)`` an exact dynamic
   programme over the budget (integer BOPs divided by their gcd; rounded *up* to ``T/resolution``
   units when that is too fine, so no solution exceeds the budget) gives the best configuration for
   every BOPs level; ``J`` is then evaluated for each.
4. **Flattest within budget.** The ``candidates`` best configurations by the additive ``J`` (plus every
   uniform configuration that fits) are measured with the real ``L_SA``; the lowest measured ``J`` wins.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..checks import check_int
from ..quant.activations import ATTR
from ..quant.ptq import ptq
from ..quant.select import Selector
from ..quant.spec import QuantSpec
from .bops import bops_from_macs
from .search import SEARCHES, ActBits, MixedPrecisionResult, SearchProblem, act_bits


class _Views:
    """The model quantized at each bit width (PTQ) and a working copy assembled per configuration."""

    def __init__(self, model: nn.Module, calib: Sequence, bits: Sequence[int], selector: Selector, a_bits: ActBits,
                 w_range: str, a_range: str, granularity: str) -> None:
        self.views: dict[int, dict[str, nn.Module]] = {}
        for b in bits:
            act = act_bits(a_bits, b)
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


@SEARCHES.register("sensitivity")
def sensitivity_search(problem: SearchProblem, *, candidates: int = 8, w_range: str = "mse",
                       a_range: str = "mse", granularity: str = "channel",
                       resolution: int = 200_000) -> MixedPrecisionResult:
    """Sensitivities + exact DP (see the module docstring). ``candidates``: DP solutions measured for the
    final choice; ``w_range``/``a_range``/``granularity``: the PTQ quantizers of the views; ``resolution``:
    at most this many budget units in the DP."""
    check_int("candidates", candidates, minimum=1)
    check_int("resolution", resolution, minimum=10)
    p, bits, free = problem, problem.bits, problem.free
    views = _Views(p.model, p.data, bits, p.selector, p.a_bits, w_range, a_range, granularity)
    weights = [views.layers[n].weight for n in p.layers]
    top = bits[-1]

    def measure(config: Mapping[str, int]) -> float:
        views.assemble({n: config[n] for n in free})  # pinned layers are the same in every view
        return p.loss(views.work, weights)

    base = measure(p.full({}))
    sensitivity = {n: {b: (measure(p.full({n: b})) - base if b != top else 0.0) for b in bits} for n in free}

    fixed_bops = p.bops(p.fixed) if p.fixed else 0
    costs = np.array([[bops_from_macs(p.macs, {n: b}, {n: act_bits(p.a_bits, b) or 32}).total for b in bits]
                      for n in free], dtype=np.int64)
    deltas = np.array([[sensitivity[n][b] for b in bits] for n in free])
    units, budget_units, unit = _units(costs, int(math.floor(p.target - fixed_bops)), resolution)
    best, choices = _allocate(units, deltas, budget_units)
    feasible = np.flatnonzero(np.isfinite(best))
    approx = best[feasible] + np.array([p.penalty(fixed_bops + u * unit) for u in feasible])
    proposals: list[tuple[str, dict[str, int]]] = []
    for u in feasible[np.argsort(approx, kind="stable")][:candidates]:
        picks = _backtrack(choices, units, int(u))
        proposals.append(("dp", p.full({n: bits[j] for n, j in zip(free, picks, strict=True)})))
    for b in bits:
        proposals.append((f"uniform {b}", p.full(dict.fromkeys(free, b))))

    measured: list[dict] = []
    seen: set[tuple] = set()
    for source, config in proposals:
        key = tuple(config.values())
        if key in seen or p.bops(config) > p.target:
            continue
        seen.add(key)
        measured.append(p.row(config, measure(config), source))
    best_row = min(measured, key=lambda r: r["objective"])  # the uniform bits[0] proposal always fits
    return MixedPrecisionResult(config=dict(best_row["config"]), bops=int(best_row["bops"]), target=float(p.target),
                                loss=best_row["loss"], objective=best_row["objective"], sensitivity=sensitivity,
                                candidates=measured, search="sensitivity")
