"""Lazy matplotlib access for every module that draws (Agg back-end: no display needed)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` with the Agg back-end; a clear ImportError without the ``plots`` extra."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("plots need matplotlib: pip install 'qready[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
