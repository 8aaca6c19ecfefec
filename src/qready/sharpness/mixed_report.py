"""Evidence of a mixed-precision search for people: a per-layer markdown table (chosen bits and the
sensitivity or policy probabilities behind them) and the accuracy/fidelity-vs-BOPs frontier plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..evaluate.report import markdown_table
from ..plotting import pyplot

MARKERS = {"uniform": "o", "sensitivity": "s", "reinforce": "^"}


def _evidence(row: Mapping) -> str:
    if "probabilities" in row:
        return " ".join(f"{b}:{p:.2f}" for b, p in row["probabilities"].items())
    if "sensitivity" in row:
        return " ".join(f"{b}:{d:+.3g}" for b, d in row["sensitivity"].items())
    return "pinned"


def layer_table(summary: Mapping) -> str:
    """Markdown table of a search summary (:meth:`MixedPrecisionResult.to_dict` with ``macs``): per layer
    its bits, MACs, BOPs and the evidence -- ``bits:Δloss`` (sensitivity) or ``bits:probability``
    (REINFORCE policy); pinned layers say so."""
    kind = "policy probability per bit width" if summary["search"] == "reinforce" else "Δ loss per bit width"
    lines = [[r["name"], r["bits"], r.get("macs", ""), r.get("bops", ""), _evidence(r)] for r in summary["layers"]]
    head = (f"Search `{summary['search']}`: BOPs {summary['bops']:.4g} / budget {summary['target']:.4g} "
            f"({summary['bops_ratio']:.3f}), loss {summary['loss']:.4f}, {summary['seconds']:.1f} s.\n\n")
    return head + markdown_table(["layer", "bits", "MACs", "BOPs", kind], lines)


def write_evidence(summary: Mapping, directory: str | Path) -> tuple[Path, Path]:
    """Write ``mixed_precision.json`` (the summary) and ``mixed_precision.md`` (:func:`layer_table`) into
    ``directory``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "mixed_precision.json", directory / "mixed_precision.md"
    json_path.write_text(json.dumps(summary, indent=2))
    md_path.write_text(f"# Mixed precision\n\n{layer_table(summary)}\n")
    return json_path, md_path


def plot_frontier(panels: Mapping[str, Sequence[Mapping]], path: str | Path) -> Path:
    """One panel per title: points ``{method, bops, value}`` (method ``uniform``, ``sensitivity`` or
    ``reinforce``; any other name gets a default marker), value against BOPs (log scale). Uniform
    points are joined by a line: the frontier mixed configurations are judged against."""
    plt = pyplot()
    path = Path(path)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels.items(), strict=False):
        methods = dict.fromkeys(p["method"] for p in points)
        for method in methods:
            mine = sorted((p["bops"], p["value"]) for p in points if p["method"] == method)
            xs, ys = [x for x, _ in mine], [y for _, y in mine]
            ax.plot(xs, ys, marker=MARKERS.get(method, "x"), linestyle="-" if method == "uniform" else "none",
                    label=method, markersize=7)
        ax.set_xscale("log")
        ax.set_xlabel("BOPs")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
