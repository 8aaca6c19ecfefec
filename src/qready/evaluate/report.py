"""Tables of sweep results: markdown for files, rich for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

# sweep-row metrics shown in reports: key -> (section title, number format)
SWEEP_METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("Test accuracy (%) after PTQ", ".2f"),
    "agreement": ("Top-1 agreement with the float model (%), all inputs", ".2f"),
    "agreement_confident": ("Top-1 agreement with the float model (%), inputs where it is confident", ".2f"),
    "kl": ("KL(float ‖ quantized) (nats per input)", ".3g"),
    "sqnr_db": ("Output SQNR (dB)", ".1f"),
}


def _fmt(value: object, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def pivot_sweep(rows: Sequence[dict], metric: str = "accuracy") -> tuple[list[str], list[list[str]]]:
    """Pivot sweep rows into one line per range method and one column per bit setting.

    Returns ``(header, lines)``: header ``["range", "FP", "W8", ...]`` in first-seen order; numbers
    formatted as :data:`SWEEP_METRICS` says (two decimals for other metrics).
    """
    spec = SWEEP_METRICS.get(metric, ("", ".2f"))[1]
    labels: list[str] = []
    for row in rows:
        if row["label"] not in labels:
            labels.append(row["label"])
    methods: list[str] = []
    for row in rows:
        if row["label"] != "FP" and row["range"] not in methods:
            methods.append(row["range"])
    fp = next((r.get(metric) for r in rows if r["label"] == "FP"), None)
    lines = []
    for method in methods or [rows[0]["range"]]:
        by_label = {r["label"]: r.get(metric) for r in rows if r["range"] == method and r["label"] != "FP"}
        lines.append([method] + [_fmt(fp if lab == "FP" else by_label.get(lab), spec) for lab in labels])
    return ["range", *labels], lines


def sweep_tables(rows: Sequence[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, lines)`` for each metric of :data:`SWEEP_METRICS` the rows carry: accuracy
    when the data was labelled, the fidelity to the float model always."""
    present = [m for m in SWEEP_METRICS if any(row.get(m) is not None for row in rows)]
    return [(SWEEP_METRICS[m][0], *pivot_sweep(rows, m)) for m in present]


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def print_table(header: Sequence[str], lines: Sequence[Sequence[object]], title: str | None = None) -> None:
    """Print a table with rich, cells never truncated (see :func:`print_untruncated`)."""
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(str(name), justify="left" if i == 0 else "right")
    for line in lines:
        table.add_row(*[_fmt(c) for c in line])
    print_untruncated(table)


def print_untruncated(renderable: object, console: object | None = None) -> object:
    """Print a rich renderable without truncating cells (``98…``): on a narrow terminal or a pipe the
    console is widened to what it needs. Returns the console used."""
    from rich.console import Console
    from rich.measure import Measurement

    console = console or Console()
    needed = Measurement.get(console, console.options.update_width(10_000), renderable).maximum
    if needed > console.width:
        console = Console(width=needed)
    console.print(renderable)
    return console
