"""Choosing the clipping range, then the scale and zero point, of each scale group.

* ``minmax``: the observed extremes of the group.
* ``percentile``: the ``p``-th percentile of ``|w|`` (symmetric) or the ``(100-p)``-th and ``p``-th
  percentiles of ``w`` (asymmetric).
* ``mse``: the min-max range shrunk by the ratio ``r`` in ``{1/n, 2/n, ..., 1}`` that minimises
  ``||W - Q_r(W)||^2`` per group. ``r = 1`` is a candidate, so the MSE range's error is never above
  the min-max range's.

All functions take the ``[G, M]`` rows of :mod:`qready.quant.grid` and return ``[G]`` tensors.
"""

from __future__ import annotations

import math

import torch

from .spec import QuantSpec

MIN_SCALE = 1e-12
MSE_BLOCK_ELEMENTS = 1 << 14


def _row_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-quantile (``q`` in [0, 1]) by order statistic; ``values`` is ``[G, M]``."""
    m = values.shape[1]
    k = min(max(int(math.ceil(q * m)), 1), m)
    return torch.kthvalue(values, k, dim=1).values


def observed_range(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` per row before any MSE shrinking; symmetric ranges are ``(-amax, amax)``."""
    if spec.range == "percentile" and spec.percentile < 100.0:
        p = spec.percentile / 100.0
        if spec.symmetric:
            amax = _row_quantile(rows.abs(), p)
            return -amax, amax
        return _row_quantile(rows, 1.0 - p), _row_quantile(rows, p)
    if spec.symmetric:
        amax = rows.abs().amax(dim=1)
        return -amax, amax
    return rows.amin(dim=1), rows.amax(dim=1)


def scale_zero_point_from_range(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point (both ``[G]``) for ranges ``[lo, hi]`` on the grid of ``spec``.

    Symmetric: ``scale = max(|lo|, |hi|) / qmax``, zero point 0. Asymmetric: the range is widened to
    contain 0, ``scale = (hi - lo) / (qmax - qmin)``, ``zp = clamp(qmin - round(lo / scale))``.
    """
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / spec.qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / float(spec.qmax - spec.qmin)).clamp_min(MIN_SCALE)
    zero_point = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return scale, zero_point


def binary_scale(rows: torch.Tensor, valid_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares scale of ``sign(w) * s``: ``s = mean |w|`` per row (padding excluded)."""
    total = rows.abs().sum(dim=1)
    counts = valid_counts if valid_counts is not None else torch.full_like(total, rows.shape[1])
    return (total / counts.clamp_min(1)).clamp_min(MIN_SCALE)


def compute_scale_zero_point(
    rows: torch.Tensor, spec: QuantSpec, valid_counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[G]`` for ``rows`` ``[G, M]`` (float, detached) under ``spec``."""
    rows = rows.detach()
    if spec.is_binary:
        scale = binary_scale(rows, valid_counts)
        return scale, torch.zeros_like(scale)
    lo, hi = observed_range(rows, spec)
    if spec.range != "mse":
        return scale_zero_point_from_range(lo, hi, spec)
    return _mse_search(rows, lo, hi, spec)


def _mse_search(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid search of the clipping ratio minimising the squared error of each row.

    Vectorised over rows and candidate ratios: candidates go in blocks whose ``[block, G, M]`` error
    buffer holds about :data:`MSE_BLOCK_ELEMENTS` values (at least one candidate), with in-place
    arithmetic. Each candidate's error is computed with the same operations, in the same order, as
    :func:`~qready.quant.grid.fake_quantize_rows`, and ties keep the widest range (the first
    candidate, ``r = 1``), so the result equals a candidate-by-candidate loop exactly.
    """
    n = spec.mse_grid
    ratios = torch.arange(n, 0, -1, dtype=rows.dtype, device=rows.device) / n  # r = 1 first
    scale, zp = scale_zero_point_from_range(lo * ratios[:, None], hi * ratios[:, None], spec)  # [n, G]
    block = max(1, MSE_BLOCK_ELEMENTS // rows.numel())
    err = rows.new_empty(n, rows.shape[0])
    for c0 in range(0, n, block):
        s, z = scale[c0:c0 + block, :, None], zp[c0:c0 + block, :, None]
        buf = rows * (1.0 / s)
        buf.round_().add_(z).clamp_(spec.qmin, spec.qmax).sub_(z).mul_(s).sub_(rows).square_()
        torch.sum(buf, dim=2, out=err[c0:c0 + block])
    best = err.argmin(dim=0, keepdim=True)  # the first minimum: the widest of tied ranges
    return scale.gather(0, best)[0], zp.gather(0, best)[0]
