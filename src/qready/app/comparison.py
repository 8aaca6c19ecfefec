"""The comparison report of a run directory: ``report.md`` and a self-contained ``report.html``.

Reads the experiments of the run's ``recipe.yaml`` from their directories as they are now, so a grid
still running (or stopped) is reported with what has finished and the rest marked missing; without a
recipe, ``experiments.json`` (written by ``qready run``), and a directory holding only ``sweep.json`` is
treated as one experiment. It groups experiments that differ only in their seed, and reports per group
the mean ± std over seeds of every sweep cell and of the compressed model, file sizes and compression
ratios, accuracy-vs-bits curves and the weight histograms. Without labels the cells are the top-1
agreement with the float model instead of the accuracy.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from pathlib import Path

from ..evaluate.report import markdown_table
from ..sharpness.mixed_report import layer_table


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def headline_metric(experiments: list[dict]) -> tuple[str, str]:
    """``(row key, name)`` of the number the comparison shows: test accuracy when the sweeps had
    labels, else the top-1 agreement with the float model (label-free data)."""
    rows = [row for exp in experiments for row in exp.get("sweep", [])]
    if any(row.get("accuracy") is not None for row in rows) or not rows:
        return "accuracy", "Test accuracy (%)"
    return "agreement", "Top-1 agreement with the float model (%)"


def finished(exp: dict) -> bool:
    """Whether an experiment summary holds results (a sweep or a compressed row)."""
    return "sweep" in exp or "compress" in exp


def load_experiments(root: Path) -> list[dict]:
    """Experiment summaries of ``root`` (see module docstring); unfinished experiments are included
    with their id and overrides only."""
    from .stages import experiment_summary

    if (root / "recipe.yaml").is_file():
        from .pipeline import expand_grid, read_recipe_file

        experiments = [{"id": exp.id, "overrides": exp.overrides,
                        **experiment_summary(root if exp.id == "main" else root / exp.id)}
                       for exp in expand_grid(read_recipe_file(root / "recipe.yaml"))]
        if any(finished(exp) for exp in experiments):
            return experiments
    path = root / "experiments.json"
    if path.is_file():
        return json.loads(path.read_text())
    if (root / "sweep.json").is_file():
        return [{"id": "main", "overrides": {}, **experiment_summary(root)}]
    raise FileNotFoundError(f"{root} holds neither experiments.json nor sweep.json: is it a qready run directory?")


def slug(value: object) -> str:
    """A short label for a grid value: regularizer lists by their names, dicts by their ``name``."""
    if isinstance(value, dict):
        name = value.get("name") or value.get("method")
        if name and "weight" in value:
            name = f"{name}@{value['weight']}"
        value = name or ",".join(f"{k}:{slug(v)}" for k, v in value.items())
    if isinstance(value, list):
        value = "+".join(slug(v) for v in value) or "none"
    return str(value).replace("/", "-").replace(" ", "")


def group_key(exp: dict) -> str:
    """The experiment's id without its seed part, as a label (``"baseline"`` when nothing is left)."""
    parts = [p for p in str(exp.get("id", "")).split("__") if p and p != "main" and not p.startswith("seed=")]
    return ", ".join(parts) or "baseline"


def comparison_table(experiments: list[dict]) -> tuple[list[str], list[list[str]], dict[str, dict]]:
    """Header, lines (one per group) and per-group numeric series (for curves), of the
    :func:`headline_metric`."""
    metric = headline_metric(experiments)[0]
    groups: dict[str, list[dict]] = {}
    for exp in experiments:
        groups.setdefault(group_key(exp), []).append(exp)
    columns: list[str] = []
    for exp in experiments:
        for row in exp.get("sweep", []):
            col = "FP" if row["label"] == "FP" else f"{row['label']} {row['range']}"
            if col not in columns:
                columns.append(col)
    has_compress = any("compress" in e for e in experiments)
    has_export = any("export" in e for e in experiments)
    header = ["experiment", "seeds", *columns]
    if has_compress:
        header.append("compressed")
    if has_export:
        header += ["file (KiB)", "× smaller than fp32"]
    lines, series = [], {}
    for name, exps in groups.items():
        cells: dict[str, list[float]] = {}
        done = [exp for exp in exps if finished(exp)]
        for exp in done:
            for row in exp.get("sweep", []):
                col = "FP" if row["label"] == "FP" else f"{row['label']} {row['range']}"
                cells.setdefault(col, []).append(row[metric])
        seeds = str(len(exps)) if len(done) == len(exps) else f"{len(done)} of {len(exps)} (missing: not finished)"
        line = [name, seeds] + [_mean_std(cells.get(c, [])) for c in columns]
        if has_compress:
            accs = [e["compress"]["row"][metric] for e in exps if "compress" in e]
            label = next((e["compress"]["row"]["label"] for e in exps if "compress" in e), "")
            line.append(f"{label}: {_mean_std(accs)}" if accs else "-")
        if has_export:
            sizes = [e["export"] for e in exps if "export" in e]
            line.append(f"{statistics.mean(s['bytes'] for s in sizes) / 1024:.1f}" if sizes else "-")
            line.append(f"{statistics.mean(s['ratio'] for s in sizes):.1f}" if sizes else "-")
        lines.append(line)
        series[name] = {c: statistics.mean(v) for c, v in cells.items()}
    return header, lines, series


def plot_group_curves(experiments: list[dict], path: Path) -> Path | None:
    """Mean accuracy (or agreement, see :func:`headline_metric`) vs weight bits (weight-only settings),
    one line per group and range method."""
    from ..plotting import pyplot

    metric, name = headline_metric(experiments)
    curves: dict[str, dict[int, list[float]]] = {}
    for exp in experiments:
        for row in exp.get("sweep", []):
            if row["w_bits"] is None or row["a_bits"] is not None:
                continue
            key = f"{group_key(exp)} ({row['range']})"
            curves.setdefault(key, {}).setdefault(row["w_bits"], []).append(row[metric])
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, points in curves.items():
        bits = sorted(points)
        ax.plot(bits, [statistics.mean(points[b]) for b in bits], marker="o", label=key)
    ax.set_xlabel("weight bits (PTQ)")
    ax.set_ylabel(f"{name[0].lower()}{name[1:]}, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_comparison(root: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for the run directory ``root``; returns both paths."""
    root = Path(root)
    experiments = load_experiments(root)
    header, lines, _ = comparison_table(experiments)
    title = f"{headline_metric(experiments)[1]}, mean ± std over seeds"
    curves = plot_group_curves(experiments, root / "curves.png")
    histograms = []
    seen: set[str] = set()
    for exp in experiments:
        name = group_key(exp)
        png = Path(exp.get("dir", root)) / "weights.png"
        if name not in seen and png.is_file():
            seen.add(name)
            histograms.append((name, png))

    missing = [exp["id"] for exp in experiments if not finished(exp)]
    status = (f" {len(missing)} of them not finished yet (marked; their cells are `-`): {', '.join(missing)}."
              if missing else "")
    md = ["# qready report\n", f"Run directory `{root}`: {len(experiments)} experiment(s).{status}\n",
          f"## {title}\n", markdown_table(header, lines)]
    if curves:
        md.append("\n## Accuracy vs bits\n\n![accuracy vs bits](curves.png)\n")
    for name, png in histograms:
        md.append(f"\n## Weights: {name}\n\n![weights {name}]({png.relative_to(root) if png.is_relative_to(root) else png})\n")
    for exp in experiments:
        mixed = exp.get("compress", {}).get("mixed_precision")
        if mixed is not None:
            md.append(f"\n## Mixed precision: {exp['id']}\n\n{layer_table(mixed)}\n")
    md_path = root / "report.md"
    md_path.write_text("\n".join(md))

    rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in line) + "</tr>" for line in lines)
    head_html = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>qready report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}",
        "img{max-width:100%}</style></head><body>",
        f"<h1>qready report</h1><p>Run directory <code>{html.escape(str(root))}</code>: "
        f"{len(experiments)} experiment(s).{html.escape(status)}</p>",
        f"<h2>{html.escape(title)}</h2>",
        f"<table id='results'><thead><tr>{head_html}</tr></thead><tbody>{rows_html}</tbody></table>",
    ]
    if curves:
        parts += ["<h2>Accuracy vs bits</h2>", _img_tag(curves, "accuracy vs bits")]
    for name, png in histograms:
        parts += [f"<h2>Weights: {html.escape(name)}</h2>", _img_tag(png, f"weights {name}")]
    parts.append(
        "<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
        "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});</script></body></html>"
    )
    html_path = root / "report.html"
    html_path.write_text("\n".join(parts))
    return md_path, html_path
