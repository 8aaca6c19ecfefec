"""Quantization-readiness diagnosis of a trained model: which layers will suffer most from PTQ.

Per selected layer: weight statistics (range, max|w|/std, outlier share, kurtosis) and the
first-order PTQ sensitivity estimate

    S_b = Σ_g (δ_{b,g} / 2) · ‖∇_{W_g} L‖₁

where ``g`` runs over the scale groups of the quantizer (one per tensor, channel or group), ``δ_{b,g}``
is the group's grid step at ``b`` bits (the ``scale`` of :func:`compute_qparams`; ``2·scale`` for 1 bit,
the distance between ``±scale``) and ``∇L`` is the cross-entropy gradient over a few batches in eval
mode (BatchNorm frozen). Rounding moves each weight by at most ``δ/2``, so by Hölder's inequality
``S_b`` bounds the first-order loss change of quantizing that layer alone (Alizadeh et al., 2020).
Optionally the actual loss increase of quantizing only that layer is measured for comparison, with
the fidelity of that model to the float one (KL(float ‖ quantized) in nats, top-1 agreement, output
SQNR; see :mod:`qready.evaluate.fidelity`): which layer's rounding moves the outputs most.

Without labels (tensor or dict batches) the float model's own top-1 classes are the targets of the
cross-entropy, so the gradient and the measured loss increase stay defined.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..batching import forward, model_device, move_inputs, output_tensor, split_batch
from ..checks import check_int
from ..quant.functional import compute_qparams, fake_quantize
from ..quant.grid import to_rows
from ..quant.layers import layer_spec
from ..quant.select import Selector, as_selector, is_depthwise
from ..quant.spec import QuantSpec
from ..regularizers.stats import weight_stats
from .fidelity import FidelityMeter
from .metrics import batch_to_device
from .sweep import parse_bit_setting

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

KEEP_MEDIAN_FACTOR = 2.0  # a layer whose S exceeds this multiple of the median S is flagged
KEEP_TOP_FRACTION = 0.1  # ... and so is the top 10% (at least one layer)
HEAVY_TAIL_KURTOSIS = 10.0  # Gaussian weights have kurtosis 3, Laplace 6


@dataclass
class Diagnosis:
    """The result of :func:`diagnose`.

    ``layers``: one dict per selected layer in model order with ``name, type, numel, min, max, range,
    max_abs, std, max_abs_over_std, outlier_share`` (fraction of ``|w − mean| > 3·std``), ``kurtosis``
    (Pearson, 3 for a Gaussian), ``grad_l1`` (‖∇_W L‖₁), ``sensitivity`` ({bits: S_b}, loss units),
    ``measured`` ({bits: loss increase when only this layer is quantized} or ``None``), ``fidelity``
    ({bits: {kl, agreement, agreement_confident, sqnr_db}} of that model against the float one, or
    ``None``), ``rank``
    (1 = the most sensitive layer at the lowest bit width: by the measured loss increase when it was
    measured, else by the estimate S), ``position`` (``"first"``, ``"last"`` or ``None``) and
    ``keep_higher`` (recommended to stay at a higher precision).
    ``recommend``: human-readable recommendations. ``spearman``: {bits: rank correlation between
    estimated and measured increase across layers} (empty without measurements). ``labelled``: whether
    the batches had targets (otherwise the float model's top-1 classes served as targets).
    ``ranked_by``: ``"measured"`` or ``"estimate"``.
    """

    layers: list[dict]
    recommend: list[str]
    bits: tuple[int, ...]
    spec: dict
    loss: float
    num_samples: int
    spearman: dict[int, float | None] = field(default_factory=dict)
    labelled: bool = True
    ranked_by: str = "estimate"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes ``None``; bit-width keys stay ints until serialized)."""
        return _finite(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string (strict JSON: no NaN)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def table(self, title: str | None = None):
        """A rich ``Table``: one row per layer in model order, the rank (by the measured increase when
        measured), the measured increase ``ΔL`` at the lowest bit width beside the estimates ``S`` per
        bit width, and flags."""
        from rich.table import Table

        low = min(self.bits)
        table = Table(title=title or f"Quantization readiness (loss {self.loss:.4g} on {self.num_samples} samples)")
        width = max((len(layer["name"]) for layer in self.layers), default=5)
        table.add_column("rank", justify="right")
        table.add_column("layer", no_wrap=True, min_width=width)
        for name in ("type", "numel", "range", "max|w|/σ", "outl. %", "kurt."):
            table.add_column(name, justify="left" if name == "type" else "right")
        measured = any(layer["measured"] is not None for layer in self.layers)
        if measured:
            table.add_column(f"ΔL W{low}", justify="right")
        for b in self.bits:
            table.add_column(f"S W{b}", justify="right")
        if measured:
            table.add_column(f"KL W{low}", justify="right")
        table.add_column("note")
        for layer in self.layers:
            row = [str(layer["rank"]), layer["name"], layer["type"], str(layer["numel"]), _g(layer["range"]),
                   _g(layer["max_abs_over_std"]), f"{100 * layer['outlier_share']:.2f}", _g(layer["kurtosis"])]
            if measured:
                row.append(_g(layer["measured"][low]))
            row += [_g(layer["sensitivity"][b]) for b in self.bits]
            if measured:
                row.append(_g(layer["fidelity"][low]["kl"]))
            notes = [p for p in (layer["position"], "keep higher" if layer["keep_higher"] else None) if p]
            row.append(", ".join(notes))
            table.add_row(*row, style="bold" if layer["keep_higher"] else None)
        return table


def _g(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def outlier_share(weight: torch.Tensor, k: float = 3.0) -> float:
    """Fraction of elements with ``|w − mean| > k·std`` (population std, float64); 0 when std is 0."""
    w = weight.detach().to(torch.float64).flatten()
    centred = w - w.mean()
    std = centred.pow(2).mean().sqrt()
    return float((centred.abs() > k * std).double().mean()) if std > 0 else 0.0


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation of two equal-length sequences (average ranks for ties);
    ``None`` when either is constant or shorter than 2."""
    ra, rb = _average_ranks(np.asarray(a, dtype=np.float64)), _average_ranks(np.asarray(b, dtype=np.float64))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _check_bits(bits: Sequence[int | str]) -> tuple[int, ...]:
    if isinstance(bits, (int, str)) or not bits:
        raise ValueError(f"bits must be a non-empty sequence of weight bit widths 1-8, e.g. (8, 4, 3, 2); got {bits!r}")
    out = []
    for setting in bits:
        w_bits, a_bits = parse_bit_setting(setting)
        if a_bits is not None:
            raise ValueError(f"bits: the diagnosis is about weights only; got activation setting {setting!r}")
        out.append(w_bits)
    return tuple(dict.fromkeys(out))


def _step_l1(weight: torch.Tensor, grad: torch.Tensor, spec: QuantSpec) -> float:
    """``Σ_g (δ_g / 2) · ‖grad_g‖₁`` over the scale groups of ``spec`` (float64)."""
    params = compute_qparams(weight.detach(), spec)
    step = params.scale.double() * (2.0 if spec.is_binary else 1.0)
    rows = to_rows(grad.detach().double().abs(), params.granularity, params.axis, params.group_size)
    return float((step.to(rows.device) / 2 * rows.sum(dim=1)).sum())


def _batch_losses(model: nn.Module, batches: Sequence, criterion: Criterion,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch, ``(criterion weighted by the batch's share of the samples, output)``: the weighted
    losses sum to the mean loss."""
    total = sum(int(y.shape[0]) for _, y in batches)
    for batch in batches:
        x, y = batch_to_device(batch, device, "diagnose")
        out = output_tensor(forward(model, x))
        yield criterion(out, y) * (y.shape[0] / total), out


def _loss(model: nn.Module, batches: Sequence, criterion: Criterion, device: torch.device) -> float:
    """Sample-weighted mean of ``criterion`` over the ``(x, y)`` ``batches``."""
    return float(sum(loss.item() for loss, _ in _batch_losses(model, batches, criterion, device)))


def _gradients(model: nn.Module, weights: list[torch.Tensor], batches: Sequence, criterion: Criterion,
               device: torch.device) -> list[torch.Tensor]:
    """∇L for each tensor of ``weights`` (without touching ``.grad``), one batch at a time."""
    grads = [torch.zeros_like(w) for w in weights]
    saved = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        for loss, _ in _batch_losses(model, batches, criterion, device):
            for acc, g in zip(grads, torch.autograd.grad(loss, weights, allow_unused=True), strict=True):
                if g is not None:
                    acc += g
    finally:
        for w, flag in zip(weights, saved, strict=True):
            w.requires_grad_(flag)
    return grads


@torch.no_grad()
def _measure(model: nn.Module, weight: torch.Tensor, spec: QuantSpec, bits: Sequence[int], batches: Sequence,
             refs: Sequence[torch.Tensor], criterion: Criterion, device: torch.device,
             base: float) -> tuple[dict[int, float], dict[int, dict[str, float | None]]]:
    """Loss increase, and fidelity to the float outputs ``refs``, when only ``weight`` is fake-quantized
    at each bit width (restored afterwards); one pass over ``batches`` per bit width."""
    original = weight.detach().clone()
    increase, fid = {}, {}
    try:
        for b in bits:
            weight.copy_(fake_quantize(original, spec.with_bits(b)))
            meter, loss = FidelityMeter(), 0.0
            for (part, out), ref in zip(_batch_losses(model, batches, criterion, device), refs, strict=True):
                loss += float(part)
                meter.update(ref, out)
            res = meter.result()
            increase[b] = loss - base
            fid[b] = {k: res[k] for k in ("kl", "agreement", "agreement_confident", "sqnr_db")}
    finally:
        weight.copy_(original)
    return increase, fid


def _largest_kl(layers: list[dict], bits: Sequence[int]) -> list[str]:
    """Which layer, quantized alone, moves the outputs most, at the highest and lowest bit widths."""
    lines = []
    for b in dict.fromkeys((max(bits), min(bits))):
        kls = [layer["fidelity"][b]["kl"] for layer in layers]
        worst = int(np.argmax(kls))
        share = f", {100 * kls[worst] / sum(kls):.0f}% of the sum over layers" if sum(kls) > 0 else ""
        lines.append(f"largest output error at W{b} when quantized alone: {layers[worst]['name']} "
                     f"(KL {kls[worst]:.3g} nats{share})")
    return lines


def _score(layer: dict, low: int) -> float:
    """What ranks a layer at ``low`` bits: its measured loss increase when measured, else the estimate S."""
    return layer["measured"][low] if layer["measured"] is not None else layer["sensitivity"][low]


def _recommend(layers: list[dict], low: int) -> list[str]:
    """Flag layers to keep at higher precision (sets ``keep_higher``) and say why, in words."""
    scores = np.array([_score(layer, low) for layer in layers])
    median = float(np.median(scores))
    top = max(1, math.ceil(KEEP_TOP_FRACTION * len(layers)))
    lines = []
    for layer in sorted(layers, key=lambda item: item["rank"]):
        s = _score(layer, low)
        layer["keep_higher"] = layer["rank"] <= top or s > KEEP_MEDIAN_FACTOR * median
        if layer["keep_higher"]:
            ratio = f"{s / median:.1f}x the median" if median > 0 else "median is 0"
            where = f", {layer['position']} layer" if layer["position"] else ""
            what = (f"measured ΔL={s:.3g} ({ratio}), estimate S={layer['sensitivity'][low]:.3g}"
                    if layer["measured"] is not None else f"S={s:.3g} ({ratio})")
            lines.append(f"keep {layer['name']} at higher precision: rank {layer['rank']}/{len(layers)} at W{low}, "
                         f"{what}{where}")
    for layer in layers:
        if layer["position"] and not layer["keep_higher"]:
            lines.append(f"{layer['position']} layer {layer['name']} (often kept at 8 bits) ranks "
                         f"{layer['rank']}/{len(layers)} at W{low}: quantizing it looks safe here")
    heavy = [layer["name"] for layer in layers if layer["kurtosis"] > HEAVY_TAIL_KURTOSIS]
    if heavy:
        lines.append(f"heavy-tailed weights (kurtosis > {HEAVY_TAIL_KURTOSIS:g}) in {', '.join(heavy)}: a range "
                     "regularizer (linf, margin, soft_min_max) shrinks their grid step before PTQ")
    return lines


def diagnose(
    model: nn.Module,
    batches: Iterable,
    *,
    select: Selector | dict | None = None,
    bits: Sequence[int | str] = (8, 4, 3, 2),
    spec: QuantSpec | None = None,
    num_batches: int = 4,
    measure: bool = True,
    criterion: Criterion | None = None,
) -> Diagnosis:
    """Diagnose how ready ``model`` is for weight PTQ, layer by layer.

    Args:
        model: any ``nn.Module``; it is left unchanged (weights, ``.grad`` and train/eval mode).
        batches: batches of any form of :mod:`qready.batching` (e.g. a training DataLoader); the first
            ``num_batches`` are used for the gradient and the measurements. Unlabeled batches take the
            float model's top-1 classes as targets.
        select: which layers (a :class:`Selector` or its keyword arguments); first/last flags refer to
            the selector's candidates.
        bits: weight bit widths (1-8) to estimate at; layers are ranked at the lowest.
        spec: quantizer template (its ``bits`` is replaced; per channel, each layer's own output-channel
            axis); default per-channel symmetric min-max.
        num_batches: how many batches to use.
        measure: also measure the actual loss increase, and the fidelity to the float model, of
            quantizing each layer alone (one evaluation of the batches per layer and bit width).
        criterion: ``criterion(logits, y) -> mean loss of the batch``; default cross-entropy.
    Returns:
        a :class:`Diagnosis`.
    """
    bit_list = _check_bits(bits)
    check_int("num_batches", num_batches, minimum=1)
    spec = spec if spec is not None else QuantSpec(bits=8, granularity="channel")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec or None, got {type(spec).__name__}")
    selector = as_selector(select)
    chosen = selector.select(model)
    if not chosen:
        raise ValueError(f"select: no layer of {type(model).__name__} matches the selector; nothing to diagnose")
    cached = []
    for batch in batches:
        if len(cached) >= num_batches:
            break
        cached.append(split_batch(batch))
    if not cached:
        raise ValueError("batches: the iterable yielded no batch")
    criterion = criterion or nn.functional.cross_entropy
    device = model_device(model)
    candidates = [name for name, _ in selector.candidates(model)]
    edges = {candidates[0]: "first", candidates[-1]: "last"}

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # the float outputs: fidelity references, and targets for unlabeled batches
            refs = [output_tensor(forward(model, move_inputs(x, device))) for x, _ in cached]
        labelled = all(y is not None for _, y in cached)
        cached = [(x, y if y is not None else ref.argmax(dim=1).cpu()) for (x, y), ref in zip(cached, refs, strict=True)]
        weights = [item.module.weight for item in chosen]
        grads = _gradients(model, weights, cached, criterion, device)
        with torch.no_grad():
            base = _loss(model, cached, criterion, device)
        layers = []
        for item, weight, grad in zip(chosen, weights, grads, strict=True):
            stats = weight_stats(weight)
            measured, fid = (_measure(model, weight, layer_spec(item.module, spec), bit_list, cached, refs,
                                      criterion, device, base) if measure else (None, None))
            layers.append({
                "name": item.name,
                "type": type(item.module).__name__ + (" (dw)" if is_depthwise(item.module) else ""),
                **stats,
                "outlier_share": outlier_share(weight),
                "grad_l1": float(grad.double().abs().sum()),
                "sensitivity": {b: _step_l1(weight, grad, layer_spec(item.module, spec.with_bits(b))) for b in bit_list},
                "measured": measured,
                "fidelity": fid,
                "position": edges.get(item.name),
            })
    finally:
        model.train(was_training)

    low = min(bit_list)
    order = sorted(range(len(layers)), key=lambda i: -_score(layers[i], low))
    for rank, i in enumerate(order, start=1):
        layers[i]["rank"] = rank
    recommend = _recommend(layers, low)
    rho = {}
    if measure:
        rho = {b: spearman([ly["sensitivity"][b] for ly in layers], [ly["measured"][b] for ly in layers])
               for b in bit_list}
        if rho[low] is not None:
            recommend.append(f"first-order estimate vs measured loss increase at W{low}: "
                             f"Spearman rank correlation {rho[low]:.2f} across {len(layers)} layers")
        recommend += _largest_kl(layers, bit_list)
    if not labelled:
        recommend.append("no labels: the float model's own top-1 classes were the targets of the loss")
    return Diagnosis(layers=layers, recommend=recommend, bits=bit_list, spec=asdict(spec), loss=base,
                     num_samples=sum(int(y.shape[0]) for _, y in cached), spearman=rho, labelled=labelled,
                     ranked_by="measured" if measure else "estimate")
