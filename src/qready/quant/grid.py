"""Low-level primitives: reshaping a tensor into scale-group rows and rounding rows onto the grid.

Every granularity is handled the same way: the tensor is viewed as a matrix ``rows`` of shape
``[G, M]`` where each row shares one scale and zero point (per tensor ``G = 1``; per channel ``G = C``;
per group ``G = C * ceil(K / group_size)``, ``M = group_size``, zero-padded). Scales and zero points
are then ``[G, 1]`` columns that broadcast over a row.
"""

from __future__ import annotations

import math

import torch


def to_rows(w: torch.Tensor, granularity: str, axis: int = 0, group_size: int | None = None) -> torch.Tensor:
    """View ``w`` (any shape) as ``[G, M]`` scale-group rows (a copy only when padding is needed)."""
    if granularity == "tensor" or w.dim() == 0:
        return w.reshape(1, -1)
    moved = w.movedim(axis, 0)
    channels = moved.shape[0]
    flat = moved.reshape(channels, -1)
    if granularity == "channel":
        return flat
    if granularity != "group" or group_size is None:
        raise ValueError(f"unknown granularity {granularity!r} (or group without group_size)")
    k = flat.shape[1]
    padded_len = math.ceil(k / group_size) * group_size
    if padded_len != k:
        flat = torch.nn.functional.pad(flat, (0, padded_len - k))
    return flat.reshape(-1, group_size)


def from_rows(
    rows: torch.Tensor, shape: tuple[int, ...], granularity: str, axis: int = 0
) -> torch.Tensor:
    """Inverse of :func:`to_rows`: drop padding and restore ``shape``."""
    if granularity == "tensor" or len(shape) == 0:
        return rows.reshape(shape)
    moved_shape = list(shape)
    channels = moved_shape.pop(axis)
    moved_shape.insert(0, channels)
    k = math.prod(moved_shape[1:])
    flat = rows.reshape(channels, -1)[:, :k]
    return flat.reshape(moved_shape).movedim(0, axis)


def round_to_grid(
    rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (as floats) ``clamp(round(rows / scale) + zp, qmin, qmax)``; ``scale``/``zp`` are ``[G, 1]``.

    Uses multiplication by ``1 / scale`` and round-half-to-even, as PyTorch's fake-quantize kernels do,
    so results agree with them bit for bit.
    """
    inv_scale = 1.0 / scale
    return torch.clamp(torch.round(rows * inv_scale) + zero_point, qmin, qmax)


def fake_quantize_rows(
    rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, binary: bool
) -> torch.Tensor:
    """Quantize-dequantize ``rows`` ``[G, M]`` with ``[G, 1]`` parameters (no gradient logic)."""
    if binary:
        return torch.where(rows >= 0, scale, -scale).to(rows.dtype)
    q = round_to_grid(rows, scale, zero_point, qmin, qmax)
    return (q - zero_point) * scale
