"""Checks shared by every stage: a model must hold finite weights before it is quantized or saved."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def first_nonfinite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Description of the first floating tensor holding NaN/Inf (``None`` when all are finite)."""
    for name, t in named_tensors:
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        t = t.detach()
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int((~finite).sum()) - n_nan
            return f"{name!r} holds {n_nan} NaN and {n_inf} Inf value(s) out of {t.numel()}"
    return None


def check_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter (then buffer) of ``model`` holding NaN/Inf."""
    bad = first_nonfinite(model.named_parameters())
    kind = "parameter"
    if bad is None:
        bad, kind = first_nonfinite(model.named_buffers()), "buffer"
    if bad is not None:
        raise ValueError(f"non-finite model weights: {kind} {bad}")
