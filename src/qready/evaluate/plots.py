"""Plots (matplotlib, imported lazily, Agg back-end: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..plotting import pyplot


def plot_accuracy_vs_bits(rows: Sequence[dict], path: str | Path, title: str = "PTQ accuracy vs bits") -> Path:
    """Accuracy (%) against weight bits, one line per (range method, activation bits); FP as a dashed line.
    Rows without accuracy (unlabeled data) plot the top-1 agreement with the float model instead."""
    metric = "accuracy" if any(row.get("accuracy") is not None for row in rows) else "agreement"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["w_bits"] is None:
            continue
        key = row["range"] + ("" if row["a_bits"] is None else f", A{row['a_bits']}")
        series.setdefault(key, []).append((row["w_bits"], row[metric]))
    for key, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    fp = next((r[metric] for r in rows if r["w_bits"] is None), None)
    if fp is not None:
        ax.axhline(fp, color="gray", linestyle="--", label=f"float ({fp:.1f}%)")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("accuracy (%)" if metric == "accuracy" else "top-1 agreement with float (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
