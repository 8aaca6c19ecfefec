"""Per-layer weight statistics (how quantization-friendly a layer's range is), an epoch logger for
:func:`qready.train.fit` and before/after weight histograms for run reports."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..plotting import pyplot
from ..quant.select import Selector, as_selector

NamesOrSelector = Sequence[str] | Selector | dict | None


def layer_names(model: nn.Module, names_or_selector: NamesOrSelector = None) -> list[str]:
    """Qualified names of the layers to describe: the given names, or those a Selector selects."""
    if isinstance(names_or_selector, (list, tuple)):
        if not all(isinstance(n, str) for n in names_or_selector):
            raise TypeError("names_or_selector: a sequence must hold module names (str)")
        return list(names_or_selector)
    if names_or_selector is None or isinstance(names_or_selector, (Selector, dict)):
        return [item.name for item in as_selector(names_or_selector).select(model)]
    raise TypeError("names_or_selector must be a list of module names, a Selector, a dict of Selector "
                    f"arguments or None; got {type(names_or_selector).__name__}")


def weight_stats(weight: torch.Tensor) -> dict[str, float | int]:
    """Statistics of one weight tensor, computed in float64.

    Keys: ``numel, min, max, range (max − min), max_abs, std`` (population, ddof 0),
    ``max_abs_over_std`` and ``kurtosis`` (Pearson: m4 / m2², 3 for a Gaussian); the last two are NaN
    when std is 0.
    """
    w = weight.detach().to(torch.float64).flatten()
    centred = w - w.mean()
    m2 = centred.pow(2).mean().item()
    m4 = centred.pow(4).mean().item()
    lo, hi, max_abs = w.min().item(), w.max().item(), w.abs().max().item()
    std = math.sqrt(m2)
    return {
        "numel": w.numel(), "min": lo, "max": hi, "range": hi - lo, "max_abs": max_abs, "std": std,
        "max_abs_over_std": max_abs / std if std > 0 else math.nan,
        "kurtosis": m4 / m2**2 if m2 > 0 else math.nan,
    }


def layer_stats(model: nn.Module, names_or_selector: NamesOrSelector = None) -> list[dict]:
    """One dict per layer: ``{"name": ..., **weight_stats(layer.weight)}`` (see :func:`weight_stats`)."""
    return [{"name": name, **weight_stats(model.get_submodule(name).weight)}
            for name in layer_names(model, names_or_selector)]


class StatsLogger:
    """Training callback ``cb(epoch, metrics, model)`` that appends one JSON line per epoch,
    ``{"epoch": e, "layers": layer_stats(model, select)}``, to ``path`` (parent folders created).

    Use as ``fit(..., callbacks=[StatsLogger(selector, "run/weight_stats.jsonl")])``.
    """

    def __init__(self, select: NamesOrSelector = None, path: str | Path = "weight_stats.jsonl") -> None:
        self.select = select
        self.path = Path(path)

    def __call__(self, epoch: int, metrics: dict, model: nn.Module) -> None:
        record = {"epoch": epoch, "layers": layer_stats(model, self.select)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_weight_histograms(before: nn.Module, after: nn.Module, path: str | Path,
                           selector: NamesOrSelector = None, bins: int = 60) -> Path:
    """Save a PNG with one subplot per selected layer (chosen on ``before``): the weight histograms of
    ``before`` and ``after`` overlaid on shared bins, the ranges in the legend. Returns ``path``."""
    plt = pyplot()

    names = layer_names(before, selector)
    if not names:
        raise ValueError("plot_weight_histograms: selector matches no layer of the model")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        w0 = before.get_submodule(name).weight.detach().double().flatten().cpu()
        w1 = after.get_submodule(name).weight.detach().double().flatten().cpu()
        lo, hi = min(w0.min(), w1.min()).item(), max(w0.max(), w1.max()).item()
        edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1).numpy()
        for w, label in ((w0, "before"), (w1, "after")):
            ax.hist(w.numpy(), bins=edges, alpha=0.5, label=f"{label} [{w.min():.3g}, {w.max():.3g}]")
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
