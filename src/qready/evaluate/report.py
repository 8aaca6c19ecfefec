"""Tables of sweep results: markdown for files, rich for the terminal."""

from __future__ import annotations

from collections.abc import Sequence


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def pivot_sweep(rows: Sequence[dict], metric: str = "accuracy") -> tuple[list[str], list[list[str]]]:
    """Pivot sweep rows into one line per range method and one column per bit setting.

    Returns ``(header, lines)``: header ``["range", "FP", "W8", ...]`` in first-seen order.
    """
    labels: list[str] = []
    for row in rows:
        if row["label"] not in labels:
            labels.append(row["label"])
    methods: list[str] = []
    for row in rows:
        if row["label"] != "FP" and row["range"] not in methods:
            methods.append(row["range"])
    fp = next((r[metric] for r in rows if r["label"] == "FP"), None)
    lines = []
    for method in methods or [rows[0]["range"]]:
        by_label = {r["label"]: r[metric] for r in rows if r["range"] == method and r["label"] != "FP"}
        lines.append([method] + [_fmt(fp if lab == "FP" else by_label.get(lab)) for lab in labels])
    return ["range", *labels], lines


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def print_table(header: Sequence[str], lines: Sequence[Sequence[object]], title: str | None = None) -> None:
    """Print a table to the terminal with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(str(name), justify="left" if i == 0 else "right")
    for line in lines:
        table.add_row(*[_fmt(c) for c in line])
    Console().print(table)
